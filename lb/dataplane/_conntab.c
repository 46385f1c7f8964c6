/*
 * _conntab.c - the connection table's bulk compare-and-swap, as a tiny CPython extension.
 *
 * lb/dataplane/conntab.py selects the slots a purge frees with numpy over the mapping of conn_table
 * (docs/conn-table.md), then frees each one the way the data plane's protocol wants: a
 * compare-and-swap of its tag, from the value it was read with, to CONN_TAG_EMPTY. Through
 * ctypes and libatomic that is one foreign call per slot (about 0.6 us); here it is one call
 * for all of them (a few ns a slot). lb/dataplane/conntab.py keeps the ctypes path as its fallback.
 *
 *   cas_many(table, offsets, expected, new) -> int
 *       For each k: the 64-bit word at byte offsets[k] of the writable buffer `table` is
 *       read; if it holds expected[k], it is compare-and-swapped from expected[k] to `new`
 *       (lock cmpxchg, sequentially consistent). Returns how many swaps succeeded. A word
 *       that no longer holds its expected value (the data plane rewrote the slot after the
 *       caller read it) is left as it is and not counted. `offsets` and `expected` are
 *       C-contiguous buffers of 8-byte native integers (numpy uint64, int64 or intp; array
 *       'Q'), equally long; every offset must be 8-byte aligned and inside `table`, which
 *       is checked for all of them before any word is touched.
 *
 * The loop runs without the GIL: it only touches buffers held for the whole call (holding
 * the table's buffer keeps an mmap from being closed meanwhile), and the words it writes
 * are shared with the data plane through atomic operations anyway.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Check that a buffer holds 8-byte native integers; return how many (-1: error set). */
static Py_ssize_t u64_count(const Py_buffer *b, const char *what)
{
	const char *fmt = b->format ? b->format : "B";

	/* '@' and '=' are native order; '<' is too on the little-endian hosts XDP runs on. */
	if (*fmt == '@' || *fmt == '=' || (*fmt == '<' && PY_LITTLE_ENDIAN))
		fmt++;
	if (b->itemsize != 8 || !fmt[0] || fmt[1] || !strchr("qQlLnN", fmt[0])) {
		PyErr_Format(PyExc_TypeError,
			     "%s: expected a buffer of 8-byte integers (numpy uint64 or intp),"
			     " got format '%s' with %zd-byte items",
			     what, b->format ? b->format : "B", b->itemsize);
		return -1;
	}
	return b->len / 8;
}

static PyObject *conntab_cas_many(PyObject *self, PyObject *args)
{
	Py_buffer table = {0}, off_b = {0}, exp_b = {0};
	PyObject *offs, *exps, *new_obj, *out = NULL;
	Py_ssize_t n, k;
	unsigned long long new_val;
	const uint64_t *off, *expected;
	char *base;
	uint64_t limit, freed = 0;

	(void)self;
	if (!PyArg_ParseTuple(args, "w*OOO:cas_many", &table, &offs, &exps, &new_obj))
		return NULL;
	if (PyObject_GetBuffer(offs, &off_b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) ||
	    PyObject_GetBuffer(exps, &exp_b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT))
		goto done;
	new_val = PyLong_AsUnsignedLongLong(new_obj);
	if (new_val == (unsigned long long)-1 && PyErr_Occurred())
		goto done;
	n = u64_count(&off_b, "offsets");
	if (n < 0 || u64_count(&exp_b, "expected") < 0)
		goto done;
	if (exp_b.len != off_b.len) {
		PyErr_Format(PyExc_ValueError, "offsets and expected differ in length (%zd, %zd)",
			     n, exp_b.len / 8);
		goto done;
	}
	base = table.buf;
	off = off_b.buf;
	expected = exp_b.buf;
	if (n && ((uintptr_t)base % 8 || table.len < 8)) {
		PyErr_SetString(PyExc_ValueError,
				"table: not an 8-byte aligned buffer of at least one word");
		goto done;
	}
	/* Every offset is checked before any word is swapped: an error changes nothing. */
	limit = n ? (uint64_t)table.len - 8 : 0;
	for (k = 0; k < n; k++)
		if (off[k] % 8 || off[k] > limit) {
			PyErr_Format(PyExc_ValueError,
				     "offsets[%zd] = %llu: not an aligned word of the %zd-byte table",
				     k, (unsigned long long)off[k], table.len);
			goto done;
		}
	Py_BEGIN_ALLOW_THREADS
	for (k = 0; k < n; k++) {
		uint64_t *word = (uint64_t *)(base + off[k]);
		uint64_t want = expected[k];

		/* A plain read first: a slot rewritten meanwhile costs no locked instruction. */
		if (__atomic_load_n(word, __ATOMIC_RELAXED) != want)
			continue;
		if (__atomic_compare_exchange_n(word, &want, (uint64_t)new_val, 0, __ATOMIC_SEQ_CST,
						__ATOMIC_SEQ_CST))
			freed++;
	}
	Py_END_ALLOW_THREADS
	out = PyLong_FromUnsignedLongLong(freed);
done:
	PyBuffer_Release(&table);
	if (off_b.obj)
		PyBuffer_Release(&off_b);
	if (exp_b.obj)
		PyBuffer_Release(&exp_b);
	return out;
}

static PyMethodDef conntab_methods[] = {
	{"cas_many", conntab_cas_many, METH_VARARGS,
	 "cas_many(table, offsets, expected, new) -> int: compare-and-swap the 64-bit word at each"
	 " byte offset of the writable buffer table from its expected value to new; how many"
	 " swapped"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef conntab_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "lb.dataplane._conntab",
	.m_doc = "Bulk compare-and-swap on the mapped connection table, for lb.dataplane.conntab.",
	.m_size = -1,
	.m_methods = conntab_methods,
};

PyMODINIT_FUNC PyInit__conntab(void)
{
	return PyModule_Create(&conntab_module);
}
