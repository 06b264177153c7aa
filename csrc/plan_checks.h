// What fastopt/_plan.py checks at every step to reuse a group's plan, as C loops over Python
// lists: that the group lists the same params, that every state entry still holds the planned
// tensor under each key, and each param's .grad. Python's own passes (map with is_, itemgetter)
// cost about 40 ns per tensor and key on a 2-core EPYC: each element is a call through the
// iterator, an incref of the tensor object (a cache line written for every tensor) and a bool
// to test. Here an element is a pointer compare or a dict probe, and no tensor object is
// touched but through .grad.
//
// Python's limited API only (the module is abi3). Included by ops.cpp after <Python.h>.
#pragma once

namespace fastopt::py {

// The list or tuple `seq` at `i`, borrowed (PyList_GetItem and PyTuple_GetItem check the index).
inline PyObject* item(PyObject* seq, Py_ssize_t i) {
  return PyList_Check(seq) ? PyList_GetItem(seq, i) : PyTuple_GetItem(seq, i);
}

// The length of a list or tuple `seq` named `name`, or -1 with a TypeError set.
inline Py_ssize_t length(PyObject* seq, const char* name) {
  if (PyList_Check(seq)) return PyList_Size(seq);
  if (PyTuple_Check(seq)) return PyTuple_Size(seq);
  PyErr_Format(PyExc_TypeError, "%s must be a list or tuple", name);
  return -1;
}

// _same_objects(a, b) -> whether lists (or tuples) a and b hold the same objects in order.
inline PyObject* same_objects(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "_same_objects takes 2 arguments, got %zd", nargs);
    return nullptr;
  }
  const Py_ssize_t n = length(args[0], "a");
  const Py_ssize_t m = n < 0 ? -1 : length(args[1], "b");
  if (m < 0) return nullptr;
  if (n != m) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* x = item(args[0], i);
    PyObject* y = item(args[1], i);
    if (x == nullptr || y == nullptr) return nullptr;
    if (x != y) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// _entries_hold(entries, key, tensors) -> whether entries[i][key] is tensors[i] for every i (a
// missing key: False). The entries are the state's dicts (or any mappings).
inline PyObject* entries_hold(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_Format(PyExc_TypeError, "_entries_hold takes 3 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject* entries = args[0];
  PyObject* key = args[1];
  PyObject* tensors = args[2];
  const Py_ssize_t n = length(entries, "entries");
  const Py_ssize_t m = n < 0 ? -1 : length(tensors, "tensors");
  if (m < 0) return nullptr;
  if (n != m) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = item(entries, i);
    PyObject* planned = item(tensors, i);
    if (entry == nullptr || planned == nullptr) return nullptr;
    bool same;
    if (PyDict_Check(entry)) {  // a borrowed value, found without a call or a reference
      PyObject* value = PyDict_GetItemWithError(entry, key);
      if (value == nullptr && PyErr_Occurred()) return nullptr;
      same = value == planned;
    } else {
      PyObject* value = PyObject_GetItem(entry, key);
      if (value == nullptr) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) return nullptr;
        PyErr_Clear();
      }
      same = value == planned;
      Py_XDECREF(value);
    }
    if (!same) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// _grads(params) -> ([p.grad for p in params], how many are None). `name`: the interned "grad".
inline PyObject* grads(PyObject* params, PyObject* name) {
  const Py_ssize_t n = length(params, "params");
  if (n < 0) return nullptr;
  PyObject* out = PyList_New(n);
  if (out == nullptr) return nullptr;
  long missing = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = item(params, i);
    PyObject* g = p == nullptr ? nullptr : PyObject_GetAttr(p, name);
    if (g == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    missing += g == Py_None;
    PyList_SetItem(out, i, g);  // steals g
  }
  PyObject* count = PyLong_FromLong(missing);
  if (count == nullptr) {
    Py_DECREF(out);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, out, count);
  Py_DECREF(out);
  Py_DECREF(count);
  return pair;
}

}  // namespace fastopt::py
