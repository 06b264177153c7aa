// What fastopt/_plan.py checks at every step to reuse a group's plan, as C loops over Python
// lists: that the group lists the same params, that every state entry still holds the planned
// tensors under the planned keys, and each param's .grad. Python's own passes (map with is_,
// itemgetter) cost about 40 ns per tensor and key on a 2-core EPYC: each element is a call
// through the iterator, an incref of the tensor object (a cache line written for every tensor)
// and a bool to test. Here an element is a pointer compare or a step of a dict's walk, and no
// tensor object is touched but through .grad.
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

// _entries_are(entries, keys, values) -> whether each of the dicts `entries` holds exactly
// `keys` (a tuple), in that order, with entries[i]'s j-th value the object values[i * len(keys)
// + j]. One walk of each dict's items in place of a hash probe per key (about 15 ns each); a
// key is compared by identity first (the state's keys are interned strings), then by value.
// An entry that is not a dict, or has another size, is not the planned one: False.
inline PyObject* entries_are(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_Format(PyExc_TypeError, "_entries_are takes 3 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject* entries = args[0];
  PyObject* keys = args[1];
  PyObject* values = args[2];
  const Py_ssize_t n = length(entries, "entries");
  const Py_ssize_t k = n < 0 ? -1 : length(keys, "keys");
  const Py_ssize_t m = k < 0 ? -1 : length(values, "values");
  if (m < 0) return nullptr;
  if (m != n * k) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = item(entries, i);
    if (entry == nullptr) return nullptr;
    if (!PyDict_Check(entry) || PyDict_Size(entry) != k) Py_RETURN_FALSE;
    Py_ssize_t pos = 0;
    PyObject* key;
    PyObject* value;
    for (Py_ssize_t j = 0; PyDict_Next(entry, &pos, &key, &value); ++j) {  // borrowed
      PyObject* planned_key = item(keys, j);
      PyObject* planned = item(values, i * k + j);
      if (planned_key == nullptr || planned == nullptr) return nullptr;
      if (value != planned) Py_RETURN_FALSE;
      if (key != planned_key) {
        const int equal = PyObject_RichCompareBool(key, planned_key, Py_EQ);
        if (equal < 0) return nullptr;
        if (equal == 0) Py_RETURN_FALSE;
      }
    }
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
