/*
 * _maglev.c - the hot loops of lb/control/maglev.py, as a tiny CPython extension.
 *
 * lb/control/maglev.py computes each endpoint's offset, skip and shift (seeded hashes of its
 * identity) and keeps a pure-Python reference of every function here; the tests check that
 * both produce byte-identical output. Every buffer is native-endian uint32 (array('I')).
 *
 *   inverses(ring_size) -> bytes
 *       The table x -> x^-1 mod ring_size (0 -> 0) that makes permutations non-linear.
 *   populate(offsets, skips, shifts, weights, inverse, mode=0) -> bytes
 *       Fill a Maglev ring of len(inverse) slots: slot -> endpoint index. Endpoint i tries
 *       slots inverse[(offset + j * skip) % size] + shift (mod size) for j = 0, 1, ...
 *       Turn order is Katran's MaglevV2: in each round every endpoint adds its weight to
 *       a credit and takes one turn when the credit reaches the largest weight, so slots
 *       are proportional to weights.
 *   translate(slots, table) -> bytes
 *       out[k] = table[slots[k]], to map ring indices to the caller's backend ids.
 *   changed(old, new) -> list[int]
 *       Positions where two equally long uint32 buffers differ.
 *
 * The loops run without the GIL: they only touch buffers held for the whole call and an
 * output object nobody else can see yet.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* populate() mode: pick the cheaper of the two turn schedulers below. */
#define MODE_AUTO 0
/* populate() mode: always scan every endpoint every round. */
#define MODE_ROUNDS 1
/* populate() mode: always use the priority queue of next turns. */
#define MODE_HEAP 2

/* Rounds scan all endpoints, so they cost ring_size * max/mean weight steps; past this
 * max/mean ratio the heap's ring_size * log2(n) is cheaper. */
#define ROUNDS_MAX_SKEW 4

/* Upper bound on ring_size; lb/control/maglev.py enforces a smaller one. Keeps slot + skip and
 * slot indices inside uint32. */
#define RING_SIZE_LIMIT ((Py_ssize_t)1 << 31)

/* State shared by both schedulers while one ring is filled. */
struct fill {
	uint32_t *ring;      /* output, size slots */
	uint64_t *taken;     /* bitmap of filled slots: 8 KiB for 65537, stays in L1 */
	uint32_t *cur;       /* per endpoint: (offset + j * skip) % size of its next try */
	const uint32_t *skip;
	const uint32_t *shift;
	const uint32_t *inverse;
	uint32_t size;
	uint32_t filled;
};

/* One turn of endpoint i: walk its permutation to the first free slot and take it. */
static inline void fill_place(struct fill *f, uint32_t i)
{
	uint32_t c = f->cur[i];
	uint32_t skip = f->skip[i];
	uint32_t shift = f->shift[i];
	uint32_t slot;

	for (;;) {
		slot = f->inverse[c] + shift;
		if (slot >= f->size)
			slot -= f->size;
		c += skip;
		if (c >= f->size)
			c -= f->size;
		if (!(f->taken[slot >> 6] & ((uint64_t)1 << (slot & 63))))
			break;
	}
	f->taken[slot >> 6] |= (uint64_t)1 << (slot & 63);
	f->ring[slot] = i;
	f->cur[i] = c;
	f->filled++;
}

/* Katran's MaglevV2 loop, literally: each round, each endpoint earns its weight in credit
 * and takes a turn per max_weight of credit (at most one, as weight <= max_weight). */
static int fill_rounds(struct fill *f, const uint32_t *weight, uint32_t n, uint32_t max_weight)
{
	uint64_t *credit = calloc(n, sizeof(*credit));
	uint32_t i;

	if (!credit)
		return -1;
	for (;;) {
		for (i = 0; i < n; i++) {
			credit[i] += weight[i];
			if (credit[i] < max_weight)
				continue;
			credit[i] -= max_weight;
			fill_place(f, i);
			if (f->filled == f->size)
				goto out;
		}
	}
out:
	free(credit);
	return 0;
}

/* A pending turn: endpoint idx takes its next turn in round `round`. */
struct turn {
	uint64_t round;
	uint32_t idx;
};

static inline int turn_before(const struct turn *a, const struct turn *b)
{
	return a->round < b->round || (a->round == b->round && a->idx < b->idx);
}

/* Restore the min-heap property below position pos. */
static void heap_sift_down(struct turn *heap, uint32_t len, uint32_t pos)
{
	struct turn t = heap[pos];

	for (;;) {
		uint32_t child = 2 * pos + 1;

		if (child >= len)
			break;
		if (child + 1 < len && turn_before(&heap[child + 1], &heap[child]))
			child++;
		if (!turn_before(&heap[child], &t))
			break;
		heap[pos] = heap[child];
		pos = child;
	}
	heap[pos] = t;
}

/* Round in which an endpoint of this weight takes its k-th turn (k >= 1): the first round r
 * with r * weight >= k * max_weight. Same order as fill_rounds, without visiting endpoints
 * that have no turn in a round, so very skewed weights stay cheap. */
static inline uint64_t turn_round(uint64_t k, uint32_t weight, uint32_t max_weight)
{
	return (k * max_weight + weight - 1) / weight;
}

static int fill_heap(struct fill *f, const uint32_t *weight, uint32_t n, uint32_t max_weight)
{
	struct turn *heap = malloc((size_t)n * sizeof(*heap));
	uint64_t *turns = calloc(n, sizeof(*turns));
	uint32_t len = 0, i;

	if (!heap || !turns) {
		free(heap);
		free(turns);
		return -1;
	}
	for (i = 0; i < n; i++) {
		if (weight[i] == 0)
			continue;
		heap[len].round = turn_round(1, weight[i], max_weight);
		heap[len].idx = i;
		len++;
	}
	for (i = len / 2; i-- > 0;)
		heap_sift_down(heap, len, i);
	while (f->filled < f->size) {
		i = heap[0].idx;
		fill_place(f, i);
		turns[i]++;
		heap[0].round = turn_round(turns[i] + 1, weight[i], max_weight);
		heap_sift_down(heap, len, 0);
	}
	free(heap);
	free(turns);
	return 0;
}

static uint32_t gcd(uint32_t a, uint32_t b)
{
	while (b) {
		uint32_t t = a % b;

		a = b;
		b = t;
	}
	return a;
}

/* Check that a buffer holds whole uint32 items; return how many. */
static Py_ssize_t u32_count(const Py_buffer *b, const char *what)
{
	if (b->len % sizeof(uint32_t)) {
		PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of uint32",
			     what, b->len);
		return -1;
	}
	return b->len / (Py_ssize_t)sizeof(uint32_t);
}

/* Release every buffer a call acquired (unused ones have no obj). */
static void release_all(Py_buffer *bufs, size_t count)
{
	size_t k;

	for (k = 0; k < count; k++)
		if (bufs[k].obj)
			PyBuffer_Release(&bufs[k]);
}

static PyObject *maglev_inverses(PyObject *self, PyObject *args)
{
	Py_ssize_t size, x;
	uint32_t *inv;
	PyObject *out;

	(void)self;
	if (!PyArg_ParseTuple(args, "n:inverses", &size))
		return NULL;
	if (size < 2 || size >= RING_SIZE_LIMIT) {
		PyErr_Format(PyExc_ValueError, "ring size %zd out of range", size);
		return NULL;
	}
	out = PyBytes_FromStringAndSize(NULL, size * (Py_ssize_t)sizeof(uint32_t));
	if (!out)
		return NULL;
	inv = (uint32_t *)PyBytes_AS_STRING(out);
	inv[0] = 0;
	inv[1] = 1;
	/* size = (size / x) * x + size % x, so x^-1 = -(size / x) * (size % x)^-1 (prime size). */
	for (x = 2; x < size; x++)
		inv[x] = (uint32_t)((uint64_t)(size - size / x) * inv[size % x] % (uint64_t)size);
	return out;
}

/* Buffers of a populate() call, in argument order. */
enum { B_OFFSET, B_SKIP, B_SHIFT, B_WEIGHT, B_INVERSE, B_COUNT };

static PyObject *maglev_populate(PyObject *self, PyObject *args)
{
	static const char *const names[B_COUNT] = {"offsets", "skips", "shifts", "weights",
						   "inverse"};
	Py_buffer b[B_COUNT] = {{0}};
	Py_ssize_t size, n, k;
	int mode = MODE_AUTO, rc = 0;
	const uint32_t *off, *skip, *shift, *w, *inverse;
	uint32_t max_weight = 0;
	uint64_t total_weight = 0;
	struct fill f = {0};
	PyObject *out = NULL;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*y*y*y*|i:populate", &b[B_OFFSET], &b[B_SKIP],
			      &b[B_SHIFT], &b[B_WEIGHT], &b[B_INVERSE], &mode))
		return NULL;
	n = u32_count(&b[B_OFFSET], names[B_OFFSET]);
	for (k = B_SKIP; n >= 0 && k < B_WEIGHT + 1; k++)
		if (u32_count(&b[k], names[k]) != n) {
			if (!PyErr_Occurred())
				PyErr_Format(PyExc_ValueError, "%s and offsets differ in length",
					     names[k]);
			goto done;
		}
	size = n < 0 ? -1 : u32_count(&b[B_INVERSE], names[B_INVERSE]);
	if (size < 0)
		goto done;
	if (size < 2 || size >= RING_SIZE_LIMIT) {
		PyErr_Format(PyExc_ValueError, "ring size %zd out of range", size);
		goto done;
	}
	if (mode < MODE_AUTO || mode > MODE_HEAP) {
		PyErr_Format(PyExc_ValueError, "unknown mode %d", mode);
		goto done;
	}
	off = b[B_OFFSET].buf;
	skip = b[B_SKIP].buf;
	shift = b[B_SHIFT].buf;
	w = b[B_WEIGHT].buf;
	inverse = b[B_INVERSE].buf;
	for (k = 0; k < n; k++) {
		/* A skip sharing a factor with the size would cycle through part of the
		 * ring only, and fill_place() could then spin forever. */
		if (off[k] >= size || shift[k] >= size || skip[k] == 0 || skip[k] >= size ||
		    gcd(skip[k], (uint32_t)size) != 1) {
			PyErr_Format(PyExc_ValueError,
				     "endpoint %zd: offset %u / skip %u / shift %u invalid for "
				     "ring size %zd", k, off[k], skip[k], shift[k], size);
			goto done;
		}
		if (w[k] > max_weight)
			max_weight = w[k];
		total_weight += w[k];
	}
	if (max_weight == 0) {
		PyErr_SetString(PyExc_ValueError, "no endpoint has a weight above 0");
		goto done;
	}

	out = PyBytes_FromStringAndSize(NULL, size * (Py_ssize_t)sizeof(uint32_t));
	f.taken = calloc(((size_t)size + 63) / 64, sizeof(*f.taken));
	f.cur = malloc((size_t)n * sizeof(*f.cur));
	if (!out || !f.taken || !f.cur) {
		if (!PyErr_Occurred())
			PyErr_NoMemory();
		Py_CLEAR(out);
		goto done;
	}
	/* The inverse table must be a permutation, or a walk could spin forever. */
	for (k = 0; k < size; k++) {
		uint32_t v = inverse[k];

		if (v >= size || (f.taken[v >> 6] & ((uint64_t)1 << (v & 63)))) {
			PyErr_Format(PyExc_ValueError, "inverse table is not a permutation "
				     "(entry %zd)", k);
			Py_CLEAR(out);
			goto done;
		}
		f.taken[v >> 6] |= (uint64_t)1 << (v & 63);
	}
	memset(f.taken, 0, ((size_t)size + 63) / 64 * sizeof(*f.taken));
	memcpy(f.cur, off, (size_t)n * sizeof(*f.cur));
	f.ring = (uint32_t *)PyBytes_AS_STRING(out);
	f.skip = skip;
	f.shift = shift;
	f.inverse = inverse;
	f.size = (uint32_t)size;

	if (mode == MODE_AUTO)
		mode = (uint64_t)max_weight * (uint64_t)n <= ROUNDS_MAX_SKEW * total_weight
			? MODE_ROUNDS : MODE_HEAP;
	Py_BEGIN_ALLOW_THREADS
	if (mode == MODE_ROUNDS)
		rc = fill_rounds(&f, w, (uint32_t)n, max_weight);
	else
		rc = fill_heap(&f, w, (uint32_t)n, max_weight);
	Py_END_ALLOW_THREADS
	if (rc) {
		PyErr_NoMemory();
		Py_CLEAR(out);
	}
done:
	free(f.taken);
	free(f.cur);
	release_all(b, B_COUNT);
	return out;
}

static PyObject *maglev_translate(PyObject *self, PyObject *args)
{
	Py_buffer slots_b = {0}, table_b = {0};
	Py_ssize_t n, tn, k;
	const uint32_t *slots, *table;
	uint32_t *dst;
	PyObject *out = NULL;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*:translate", &slots_b, &table_b))
		return NULL;
	n = u32_count(&slots_b, "slots");
	tn = n < 0 ? -1 : u32_count(&table_b, "table");
	if (tn < 0)
		goto done;
	slots = slots_b.buf;
	table = table_b.buf;
	out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(uint32_t));
	if (!out)
		goto done;
	dst = (uint32_t *)PyBytes_AS_STRING(out);
	for (k = 0; k < n; k++) {
		if (slots[k] >= (uint64_t)tn) {
			PyErr_Format(PyExc_ValueError, "slot %zd holds %u, table has %zd entries",
				     k, slots[k], tn);
			Py_CLEAR(out);
			goto done;
		}
		dst[k] = table[slots[k]];
	}
done:
	if (slots_b.obj)
		PyBuffer_Release(&slots_b);
	if (table_b.obj)
		PyBuffer_Release(&table_b);
	return out;
}

/* Words compared at once while looking for the next difference. */
#define CHUNK 64

static PyObject *maglev_changed(PyObject *self, PyObject *args)
{
	Py_buffer old_b = {0}, new_b = {0};
	Py_ssize_t n, k;
	const uint32_t *a, *b;
	PyObject *out = NULL;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*:changed", &old_b, &new_b))
		return NULL;
	n = u32_count(&old_b, "old");
	if (n < 0)
		goto done;
	if (u32_count(&new_b, "new") != n) {
		if (!PyErr_Occurred())
			PyErr_Format(PyExc_ValueError, "old has %zd slots, new has %zd", n,
				     new_b.len / (Py_ssize_t)sizeof(uint32_t));
		goto done;
	}
	a = old_b.buf;
	b = new_b.buf;
	out = PyList_New(0);
	if (!out)
		goto done;
	for (k = 0; k < n; k++) {
		PyObject *pos;

		/* Rings mostly agree: skip equal stretches with memcmp. */
		if (k % CHUNK == 0 && k + CHUNK <= n &&
		    !memcmp(a + k, b + k, CHUNK * sizeof(*a))) {
			k += CHUNK - 1;
			continue;
		}
		if (a[k] == b[k])
			continue;
		pos = PyLong_FromSsize_t(k);
		if (!pos || PyList_Append(out, pos)) {
			Py_XDECREF(pos);
			Py_CLEAR(out);
			goto done;
		}
		Py_DECREF(pos);
	}
done:
	if (old_b.obj)
		PyBuffer_Release(&old_b);
	if (new_b.obj)
		PyBuffer_Release(&new_b);
	return out;
}

static PyMethodDef maglev_methods[] = {
	{"inverses", maglev_inverses, METH_VARARGS,
	 "inverses(ring_size) -> bytes of uint32: x^-1 mod ring_size, 0 -> 0"},
	{"populate", maglev_populate, METH_VARARGS,
	 "populate(offsets, skips, shifts, weights, inverse, mode=0) -> bytes of uint32 slots"},
	{"translate", maglev_translate, METH_VARARGS,
	 "translate(slots, table) -> bytes where out[k] = table[slots[k]]"},
	{"changed", maglev_changed, METH_VARARGS,
	 "changed(old, new) -> list of positions where the uint32 buffers differ"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef maglev_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "lb.control._maglev",
	.m_doc = "C loops for lb.control.maglev (ring fill, index translation, ring diff).",
	.m_size = -1,
	.m_methods = maglev_methods,
};

PyMODINIT_FUNC PyInit__maglev(void)
{
	PyObject *m = PyModule_Create(&maglev_module);

	if (m && (PyModule_AddIntConstant(m, "MODE_AUTO", MODE_AUTO) ||
		  PyModule_AddIntConstant(m, "MODE_ROUNDS", MODE_ROUNDS) ||
		  PyModule_AddIntConstant(m, "MODE_HEAP", MODE_HEAP))) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
