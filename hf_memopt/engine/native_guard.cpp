// The snapshot check of hf_memopt.engine.snapshot in C++: a few nanoseconds per tensor instead of a
// Python call per tensor (tensor.data_ptr() costs about 85 ns from Python, reading it here about 7).
// The rule is the Python one (identity.PythonChecker); tests/test_snapshot.py holds both to the same cases.
// Built by hf_memopt/engine/native_guard.py against the installed torch's headers.
#include <Python.h>

#include <cstdint>
#include <utility>
#include <vector>

#include <torch/csrc/autograd/python_variable.h>

namespace {

// The tensor types whose objects are plain (not subclasses with their own dispatch): torch.Tensor and
// torch.nn.Parameter, given by the loader.
PyObject* plain_types = nullptr;

bool plain(PyObject* o) {
  PyObject* t = reinterpret_cast<PyObject*>(Py_TYPE(o));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(plain_types); ++i) {
    if (PyTuple_GET_ITEM(plain_types, i) == t) return true;
  }
  return false;
}

// set_plain_types((torch.Tensor, torch.nn.Parameter))
PyObject* set_plain_types(PyObject*, PyObject* args) {
  PyObject* types;
  if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &types)) return nullptr;
  Py_XDECREF(plain_types);
  Py_INCREF(types);
  plain_types = types;
  Py_RETURN_NONE;
}

bool same_storage(const c10::TensorImpl* impl, int64_t ptr, int64_t nbytes) {
  // data() is the storage's address plus the offset: what Tensor.data_ptr() returns
  return impl->has_storage() && reinterpret_cast<int64_t>(impl->data()) == ptr &&
         static_cast<int64_t>(impl->numel() * impl->itemsize()) == nbytes;
}

// Pass 2 of the checks below: each collected TensorImpl (with its entry's index) still has the data pointer
// ptrs[k] and the byte size nbytes[k]; the storage of a tensor a few places ahead is prefetched.
bool same_memory(const std::vector<std::pair<const c10::TensorImpl*, Py_ssize_t>>& impls, const int64_t* ptrs,
                 const int64_t* nbytes) {
  constexpr size_t ahead = 8;
  for (size_t n = 0; n < impls.size(); ++n) {
    if (n + ahead < impls.size() && impls[n + ahead].first->has_storage()) {
      __builtin_prefetch(impls[n + ahead].first->unsafe_storage().unsafeGetStorageImpl());
    }
    const auto [impl, k] = impls[n];
    if (!same_storage(impl, ptrs[k], nbytes[k])) return false;
  }
  return true;
}

// grads(params: list, param_ptrs: int64 buffer, param_nbytes: int64 buffer, ptrs: writable int64 buffer)
//   -> list | None
// Every parameter's gradient, when each parameter still has its data pointer and byte size and each
// gradient is a plain dense contiguous tensor of its parameter's shape, dtype and device (their data
// pointers into ptrs); else None.
PyObject* grads(PyObject*, PyObject* args) {
  PyObject* params;
  Py_buffer pp, pn, out;
  if (plain_types == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "set_plain_types was not called");
    return nullptr;
  }
  if (!PyArg_ParseTuple(args, "O!y*y*w*", &PyList_Type, &params, &pp, &pn, &out)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const Py_ssize_t size = n * static_cast<Py_ssize_t>(sizeof(int64_t));
  if (out.len != size || pp.len != size || pn.len != size) {
    PyBuffer_Release(&pp);
    PyBuffer_Release(&pn);
    PyBuffer_Release(&out);
    PyErr_SetString(PyExc_ValueError, "param_ptrs, param_nbytes, ptrs: one int64 per parameter");
    return nullptr;
  }
  const auto* param_ptrs = static_cast<const int64_t*>(pp.buf);
  const auto* param_nbytes = static_cast<const int64_t*>(pn.buf);
  auto* ptrs = static_cast<int64_t*>(out.buf);
  PyObject* result = PyList_New(n);
  bool ok = result != nullptr;
  try {
    for (Py_ssize_t i = 0; ok && i < n; ++i) {
      PyObject* o = PyList_GET_ITEM(params, i);
      if (!plain(o)) {  // an exact type test: THPVariable_Check on a Parameter runs a Python __instancecheck__
        ok = false;
        break;
      }
      const at::Tensor& p = THPVariable_Unpack(o);
      const at::Tensor& g = p.grad();
      if (!same_storage(p.unsafeGetTensorImpl(), param_ptrs[i], param_nbytes[i]) || !g.defined() || g.layout() != c10::kStrided || g.sizes() != p.sizes() ||
          g.scalar_type() != p.scalar_type() || g.device() != p.device() || !g.is_contiguous()) {
        ok = false;
        break;
      }
      PyObject* wrapped = THPVariable_Wrap(g);
      if (wrapped == nullptr) {
        Py_DECREF(result);
        PyBuffer_Release(&pp);
        PyBuffer_Release(&pn);
        PyBuffer_Release(&out);
        return nullptr;
      }
      PyList_SET_ITEM(result, i, wrapped);
      if (!plain(wrapped)) {
        ok = false;
        break;
      }
      ptrs[i] = reinterpret_cast<int64_t>(g.data_ptr());
    }
  } catch (const std::exception&) {
    ok = false;  // e.g. a tensor without allocated data: not the state the snapshot recorded
  }
  PyBuffer_Release(&pp);
  PyBuffer_Release(&pn);
  PyBuffer_Release(&out);
  if (!ok) {
    Py_XDECREF(result);
    Py_RETURN_NONE;
  }
  return result;
}

// same_state(dicts: list, keys: tuple, expected: list, ptrs: int64 buffer, nbytes: int64 buffer) -> bool
// Whether dicts[i][keys[j]] is expected[k] (k = i * len(keys) + j) for every i, j, and each of those that is a
// plain tensor still has the data pointer ptrs[k] and the byte size nbytes[k].
PyObject* same_state(PyObject*, PyObject* args) {
  PyObject *dicts, *keys, *expected;
  Py_buffer pb, nb;
  if (plain_types == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "set_plain_types was not called");
    return nullptr;
  }
  if (!PyArg_ParseTuple(args, "O!O!O!y*y*", &PyList_Type, &dicts, &PyTuple_Type, &keys, &PyList_Type, &expected,
                        &pb, &nb))
    return nullptr;
  const Py_ssize_t nd = PyList_GET_SIZE(dicts), nk = PyTuple_GET_SIZE(keys);
  const auto* ptrs = static_cast<const int64_t*>(pb.buf);
  const auto* nbytes = static_cast<const int64_t*>(nb.buf);
  const Py_ssize_t total = nd * nk;
  bool ok = PyList_GET_SIZE(expected) == total && pb.len == total * static_cast<Py_ssize_t>(sizeof(int64_t)) &&
            nb.len == pb.len;
  bool error = false;
  // Two passes, for memory-level parallelism: each tensor's check follows a chain of pointers (object,
  // TensorImpl, StorageImpl), scattered on the heap, which one pass would walk one miss at a time.
  // Pass 1: the entries' identities (dict lookups), collecting the TensorImpls and prefetching them.
  std::vector<std::pair<const c10::TensorImpl*, Py_ssize_t>> impls;
  impls.reserve(static_cast<size_t>(total));
  try {
    for (Py_ssize_t i = 0; ok && i < nd; ++i) {
      PyObject* d = PyList_GET_ITEM(dicts, i);
      if (!PyDict_Check(d)) {
        ok = false;
        break;
      }
      for (Py_ssize_t j = 0; ok && j < nk; ++j) {
        const Py_ssize_t k = i * nk + j;
        PyObject* v = PyDict_GetItemWithError(d, PyTuple_GET_ITEM(keys, j));  // borrowed
        if (v == nullptr) {
          error = PyErr_Occurred() != nullptr;
          ok = false;
        } else if (v != PyList_GET_ITEM(expected, k)) {
          ok = false;
        } else if (plain(v)) {
          const c10::TensorImpl* impl = THPVariable_Unpack(v).unsafeGetTensorImpl();
          __builtin_prefetch(impl);
          impls.emplace_back(impl, k);
        }
      }
    }
    ok = ok && same_memory(impls, ptrs, nbytes);
  } catch (const std::exception&) {
    ok = false;
  }
  PyBuffer_Release(&pb);
  PyBuffer_Release(&nb);
  if (error) return nullptr;
  if (ok) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// same_entries(dicts: list, sizes: int64 buffer, keys: list, expected: list, ptrs: int64 buffer,
//              nbytes: int64 buffer) -> bool
// Whether each dicts[i] holds exactly sizes[i] entries and, walked in order, its entries are (keys[k], expected[k])
// (the same key and value objects; k runs over all entries of all dicts), and each value that is a plain tensor
// still has the data pointer ptrs[k] and the byte size nbytes[k]. Walking a dict's entries in order reads them
// where they lie, one after another; a lookup by key hashes and probes the dict's index for each.
PyObject* same_entries(PyObject*, PyObject* args) {
  PyObject *dicts, *keys, *expected;
  Py_buffer sb, pb, nb;
  if (plain_types == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "set_plain_types was not called");
    return nullptr;
  }
  if (!PyArg_ParseTuple(args, "O!y*O!O!y*y*", &PyList_Type, &dicts, &sb, &PyList_Type, &keys, &PyList_Type,
                        &expected, &pb, &nb))
    return nullptr;
  const Py_ssize_t nd = PyList_GET_SIZE(dicts), total = PyList_GET_SIZE(expected);
  const auto* sizes = static_cast<const int64_t*>(sb.buf);
  const auto* ptrs = static_cast<const int64_t*>(pb.buf);
  const auto* nbytes = static_cast<const int64_t*>(nb.buf);
  bool ok = sb.len == nd * static_cast<Py_ssize_t>(sizeof(int64_t)) && PyList_GET_SIZE(keys) == total &&
            pb.len == total * static_cast<Py_ssize_t>(sizeof(int64_t)) && nb.len == pb.len;
  // Two passes, as in same_state: identities first (prefetching the TensorImpls), then pointers and sizes.
  std::vector<std::pair<const c10::TensorImpl*, Py_ssize_t>> impls;
  if (ok) impls.reserve(static_cast<size_t>(total));
  try {
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; ok && i < nd; ++i) {
      PyObject* d = PyList_GET_ITEM(dicts, i);
      if (!PyDict_Check(d) || PyDict_GET_SIZE(d) != sizes[i] || k + sizes[i] > total) {
        ok = false;
        break;
      }
      Py_ssize_t pos = 0;
      PyObject *key, *value;  // borrowed
      while (ok && PyDict_Next(d, &pos, &key, &value)) {
        if (key != PyList_GET_ITEM(keys, k) || value != PyList_GET_ITEM(expected, k)) {
          ok = false;
        } else if (plain(value)) {
          const c10::TensorImpl* impl = THPVariable_Unpack(value).unsafeGetTensorImpl();
          __builtin_prefetch(impl);
          impls.emplace_back(impl, k);
        }
        ++k;
      }
    }
    ok = ok && k == total;
    ok = ok && same_memory(impls, ptrs, nbytes);
  } catch (const std::exception&) {
    ok = false;
  }
  PyBuffer_Release(&sb);
  PyBuffer_Release(&pb);
  PyBuffer_Release(&nb);
  if (ok) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// The module's ABI: the loader refuses a library whose version differs.
PyObject* version(PyObject*, PyObject*) { return PyLong_FromLong(4); }

PyMethodDef methods[] = {
    {"set_plain_types", set_plain_types, METH_VARARGS, "set_plain_types((torch.Tensor, torch.nn.Parameter))"},
    {"grads", grads, METH_VARARGS, "grads(params, param_ptrs, param_nbytes, ptrs) -> list | None"},
    {"same_state", same_state, METH_VARARGS, "same_state(dicts, keys, expected, ptrs, nbytes) -> bool"},
    {"same_entries", same_entries, METH_VARARGS, "same_entries(dicts, sizes, keys, expected, ptrs, nbytes) -> bool"},
    {"version", version, METH_NOARGS, "the module's ABI version"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "hf_memopt_native_guard", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_hf_memopt_native_guard(void) { return PyModule_Create(&module); }
