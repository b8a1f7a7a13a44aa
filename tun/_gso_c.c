/* The GSO cut and the GRO checks as two C loops over the rows: tun.gso_numpy's Cutter and Checker,
 * byte for byte (the tests compare them), written against the plain CPython API (no numpy headers,
 * no Cython, no cffi: nothing to install to build it but a C compiler and Python's headers).
 *
 * Why loops: numpy does a cut or a check in ~20 array calls, each a pass over the table; a loop
 * touches each row once, while it is in L1: copy the payload, sum it, write the headers.
 *
 * Safety: nothing here trusts a length or an offset. Every row, packet, template and table is checked
 * against the real length of its buffer before the first byte is read or written (hostile arguments
 * raise ValueError and leave the buffers as they were); buffers are held (exported) for the whole
 * call, so a bytearray cannot be resized under us. Header fields are read and written one byte at a
 * time in network order, sums taken over native words (tun/_csum.h): no unaligned loads, no
 * architecture assumptions.
 *
 * Sums are one's complement sums taken mod 0xFFFF (2**16 = 1 mod 0xFFFF), as in tun/gso_numpy.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_csum.h"
#include "_netorder.h"

#define PROTO_TCP 6
#define PROTO_UDP 17
#define PSH 0x08
#define CWR 0x80
#define IP_HEADER 20 /* the checker's rows: IHL 5 */
#define MAX_HEADERS 120 /* IPv4 header (<= 60) + TCP header (<= 60) */
#define MAX_LENGTH 0xFFFF /* an IPv4 total length */
#define ON_STACK 256 /* rows or packets described without a heap allocation */

/* An integer argument as a long long; ValueError (not OverflowError) when it does not fit. */
static int as_int(PyObject *obj, long long *out, const char *what)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s out of range", what);
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *bad(const char *what)
{
    PyErr_SetString(PyExc_ValueError, what);
    return NULL;
}

/* ---- the cut ------------------------------------------------------------------------------------ */

typedef struct {
    long long at, count, last;
    unsigned ident, flags;
    uint32_t seq;
    const uint8_t *template;
} packet;

enum { P_AT, P_PROTO, P_IHL, P_HL, P_MSS, P_COUNT, P_LAST, P_TEMPLATE, P_IDENT, P_SEQ, P_FLAGS, P_FIELDS };

/* One tun.superpacket.Packet into ``p`` (and its shape into ``shape``, to compare with the first's). */
static int read_packet(PyObject *obj, packet *p, long long shape[4])
{
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) < P_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "a group holds tun.superpacket.Packet tuples");
        return -1;
    }
    static const char *names[] = {"offset", "protocol", "IHL", "header length", "segment size", "count",
                                  "last payload", "template", "IP ID", "sequence number", "flags"};
    long long v[P_FIELDS];
    for (int i = 0; i < P_FIELDS; i++)
        if (i != P_TEMPLATE && as_int(PyTuple_GET_ITEM(obj, i), &v[i], names[i]) < 0)
            return -1;
    PyObject *template = PyTuple_GET_ITEM(obj, P_TEMPLATE);
    if (!PyBytes_Check(template)) {
        PyErr_SetString(PyExc_TypeError, "a packet's template is bytes");
        return -1;
    }
    if (PyBytes_GET_SIZE(template) != v[P_HL]) {
        PyErr_SetString(PyExc_ValueError, "a packet's template is not its header length");
        return -1;
    }
    if (v[P_FLAGS] < 0 || v[P_FLAGS] > 0xFF) {
        PyErr_SetString(PyExc_ValueError, "TCP flags are one byte");
        return -1;
    }
    p->at = v[P_AT];
    p->count = v[P_COUNT];
    p->last = v[P_LAST];
    p->ident = (unsigned)(v[P_IDENT] & 0xFFFF);
    p->seq = (uint32_t)(v[P_SEQ] & 0xFFFFFFFF);
    p->flags = (unsigned)v[P_FLAGS];
    p->template = (const uint8_t *)PyBytes_AS_STRING(template);
    shape[0] = v[P_PROTO];
    shape[1] = v[P_IHL];
    shape[2] = v[P_HL];
    shape[3] = v[P_MSS];
    return 0;
}

/* The shape every packet of a group shares: the protocol, header lengths a parse can give, a segment
 * that fits an IPv4 total length. NULL if it is fine, else why not. */
static const char *shape_wrong(const long long s[4])
{
    long long proto = s[0], ihl = s[1], hl = s[2], mss = s[3];
    if (proto != PROTO_TCP && proto != PROTO_UDP)
        return "the protocol is neither TCP nor UDP";
    if (ihl < 20 || ihl > 60 || ihl % 4)
        return "bad IHL";
    if (proto == PROTO_TCP ? hl - ihl < 20 || hl - ihl > 60 || (hl - ihl) % 4 : hl != ihl + 8)
        return "bad header length";
    if (mss < 1 || hl + mss > MAX_LENGTH)
        return "bad segment size";
    return NULL;
}

/* Rows of one packet from out[d]: headers, total length, ID, IP checksum, sequence number and flags
 * (FIN/PSH on the last segment only, CWR on the first) or UDP length, payload, L4 checksum. */
static void cut_packet(const uint8_t *src, uint8_t *d, const packet *p, int proto, Py_ssize_t ihl,
                       Py_ssize_t hl, Py_ssize_t mss)
{
    const uint8_t *t = p->template;
    uint64_t addresses = be_sum(t + 12, 8);
    Py_ssize_t size = hl + mss;
    for (long long r = 0; r < p->count; r++, d += size) {
        Py_ssize_t payload = r < p->count - 1 ? mss : (Py_ssize_t)p->last;
        unsigned total = (unsigned)(hl + payload);
        memcpy(d, t, (size_t)hl);
        put16(d + 2, total);
        put16(d + 4, (unsigned)((p->ident + r) & 0xFFFF));
        put16(d + 10, (unsigned)((0xFFFF - be_sum(d, ihl) % 0xFFFF) % 0xFFFF));
        uint8_t *l4 = d + ihl;
        if (proto == PROTO_TCP) {
            uint32_t seq = (uint32_t)(p->seq + (uint64_t)r * (uint64_t)mss);
            put16(l4 + 4, seq >> 16);
            put16(l4 + 6, seq & 0xFFFF);
            if (r == p->count - 1)
                l4[13] = (uint8_t)(p->count == 1 ? p->flags : p->flags & ~CWR);
            else if (r == 0)
                l4[13] |= (uint8_t)(p->flags & CWR);
        } else {
            put16(l4 + 4, (unsigned)(8 + payload));
        }
        /* memmove: a caller may hand the same buffer as source and output */
        memmove(d + hl, src + p->at + hl + r * mss, (size_t)payload);
        uint64_t sum = addresses + (uint64_t)proto + total - ihl + be_sum(l4, hl - ihl) + be_sum(d + hl, payload);
        if (proto == PROTO_TCP)
            put16(l4 + 16, (unsigned)((0xFFFF - sum % 0xFFFF) % 0xFFFF));
        else /* never 0: UDP's "no checksum" */
            put16(l4 + 6, (unsigned)(0xFFFF - sum % 0xFFFF));
    }
}

PyDoc_STRVAR(cut_doc,
"cut(src, src8, src32, out, out8, at, group)\n--\n\n"
"Cut a group of like super-packets (tun.superpacket.Packet: same protocol, header lengths and\n"
"segment size) from ``src`` into rows of hl + mss bytes from ``out[at]``, as tun.gso_numpy.Cutter\n"
"does (``src8``, ``src32``, ``out8`` are that signature's array views, unused here). ValueError,\n"
"before anything is written, for any packet or row that does not fit its buffer.");

static PyObject *cut(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "cut(src, src8, src32, out, out8, at, group)");
        return NULL;
    }
    long long at;
    if (as_int(args[5], &at, "at") < 0)
        return NULL;
    Py_buffer src = {0}, out = {0};
    PyObject *seq = NULL, *result = NULL;
    packet stack[ON_STACK], *packets = stack;
    /* Hold both buffers before reading the group: converting its integers may run Python code, which
     * could otherwise resize them after their lengths were checked. */
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &out, PyBUF_WRITABLE) < 0)
        goto done;
    /* A tuple of the group's own: converting a field may run Python code (__index__), which could empty
     * the caller's list and free a packet (and its template) still in use here. */
    seq = PySequence_Tuple(args[6]);
    if (seq == NULL)
        goto done;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n == 0) {
        bad("an empty group");
        goto done;
    }
    if (n > ON_STACK && (packets = PyMem_New(packet, (size_t)n)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    long long shape[4], first[4];
    long long rows = 0; /* rows the group takes in out, checked as it grows */
    for (Py_ssize_t i = 0; i < n; i++) {
        packet *p = &packets[i];
        if (read_packet(PyTuple_GET_ITEM(seq, i), p, i ? shape : first) < 0)
            goto done;
        if (i == 0) {
            const char *why = shape_wrong(first);
            if (why) {
                bad(why);
                goto done;
            }
        } else if (memcmp(shape, first, sizeof shape)) {
            bad("packets of one group differ in protocol, header lengths or segment size");
            goto done;
        }
        long long hl = first[2], mss = first[3];
        /* reads src[at + hl, at + hl + (count - 1) * mss + last) */
        if (p->at < 0 || p->at > src.len || p->count < 1 || p->last < 0 || p->last > mss
            || hl > src.len - p->at || p->count - 1 > (src.len - p->at - hl) / mss
            || p->last > src.len - p->at - hl - (p->count - 1) * mss) {
            bad("a packet does not fit its buffer");
            goto done;
        }
        /* writes out[at, at + rows * (hl + mss)) */
        if (at < 0 || at > out.len || p->count > (out.len - at) / (hl + mss) - rows) {
            bad("the rows do not fit the output buffer");
            goto done;
        }
        rows += p->count;
    }
    {
        int proto = (int)first[0];
        Py_ssize_t ihl = (Py_ssize_t)first[1], hl = (Py_ssize_t)first[2], mss = (Py_ssize_t)first[3];
        uint8_t *d = (uint8_t *)out.buf + at;
        for (Py_ssize_t i = 0; i < n; i++) {
            cut_packet((const uint8_t *)src.buf, d, &packets[i], proto, ihl, hl, mss);
            d += (Py_ssize_t)packets[i].count * (hl + mss);
        }
    }
    result = Py_NewRef(Py_None);
done:
    if (packets != stack)
        PyMem_Free(packets);
    Py_XDECREF(seq);
    if (out.obj)
        PyBuffer_Release(&out);
    PyBuffer_Release(&src);
    return result;
}

/* ---- the GRO checks ----------------------------------------------------------------------------- */

/* A 1-D contiguous buffer of machine integers (numpy's uint32 rules, intp row orders). */
static int get_ints(PyObject *obj, Py_buffer *view, const char *what, Py_ssize_t itemsize_a, Py_ssize_t itemsize_b)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=')
        f++;
    if (view->ndim != 1 || f[0] == '\0' || f[1] != '\0' || strchr("bBhHiIlLqQnN", f[0]) == NULL
        || (view->itemsize != itemsize_a && view->itemsize != itemsize_b)) {
        PyErr_Format(PyExc_ValueError, "%s: a 1-D array of %zd-byte integers", what, itemsize_a);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline long long int_at(const Py_buffer *view, Py_ssize_t i)
{
    const char *p = (const char *)view->buf + i * view->itemsize;
    if (view->itemsize == 8) {
        int64_t v;
        memcpy(&v, p, 8);
        return v;
    }
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

PyDoc_STRVAR(check_doc,
"check(buf, base, rows, seg, hl, proto, short, mask, step, order) -> bytearray\n--\n\n"
"The GRO checks of tun.gso_numpy.Checker over a table of ``rows`` rows of ``seg`` bytes at ``base``\n"
"in ``buf`` (IHL 5 headers of ``hl`` bytes; ``short``: physical row -> its length, when shorter).\n"
"``order``: None, or the physical row of each logical row (1-D integers). Returns 3 * rows - 2 bytes\n"
"of 0/1: differ (rows - 1: logical rows i and i + 1 break the rule ``mask``/``step``), bad (rows:\n"
"a checksum fails) and psh (rows - 1: TCP PSH). ValueError for any row outside ``buf``.");

static PyObject *check(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "check(buf, base, rows, seg, hl, proto, short, mask, step, order)");
        return NULL;
    }
    long long base, rows, seg, hl, proto;
    if (as_int(args[1], &base, "base") < 0 || as_int(args[2], &rows, "rows") < 0 || as_int(args[3], &seg, "seg") < 0
        || as_int(args[4], &hl, "hl") < 0 || as_int(args[5], &proto, "proto") < 0)
        return NULL;
    PyObject *short_rows = args[6];
    if (!PyDict_Check(short_rows)) {
        PyErr_SetString(PyExc_TypeError, "short is a dict: row -> length");
        return NULL;
    }
    if (proto != PROTO_TCP && proto != PROTO_UDP)
        return bad("the protocol is neither TCP nor UDP");
    if (hl % 4 || hl < (proto == PROTO_TCP ? 40 : 28) || hl > MAX_HEADERS)
        return bad("bad header length");
    if (seg < hl || seg > MAX_LENGTH || seg % 2)
        return bad("bad row size");
    if (rows < 1 || base < 0)
        return bad("bad table");
    Py_ssize_t words = (Py_ssize_t)hl / 4;
    Py_buffer buf = {0}, mask = {0}, step = {0}, order = {0};
    Py_ssize_t stack[ON_STACK], *lengths = stack; /* per physical row */
    PyObject *result = NULL;
    int ordered = args[9] != Py_None;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (get_ints(args[7], &mask, "mask", 4, 4) < 0)
        goto done;
    if (get_ints(args[8], &step, "step", 4, 4) < 0)
        goto done;
    if (mask.shape[0] != words || step.shape[0] != words) {
        bad("mask and step have a word per header word");
        goto done;
    }
    long long in_buf = base > buf.len ? 0 : (buf.len - base) / seg; /* whole rows after base */
    long long physical = rows; /* rows a length is kept for: up to the last one order names */
    if (ordered) {
        if (get_ints(args[9], &order, "order", 8, 4) < 0)
            goto done;
        if (order.shape[0] != rows) {
            bad("order has one entry per row");
            goto done;
        }
        physical = 0;
        for (Py_ssize_t i = 0; i < rows; i++) {
            long long p = int_at(&order, i);
            if (p < 0 || p >= in_buf) {
                bad("order names a row outside the buffer");
                goto done;
            }
            if (p >= physical)
                physical = p + 1;
        }
    } else if (rows > in_buf) {
        bad("the table does not fit the buffer");
        goto done;
    }
    if (physical > ON_STACK && (lengths = PyMem_New(Py_ssize_t, (size_t)physical)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t p = 0; p < physical; p++)
        lengths[p] = (Py_ssize_t)seg;
    {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(short_rows, &pos, &key, &value)) {
            long long r, length;
            Py_INCREF(key); /* (borrowed: converting one may run code that drops the other from the dict) */
            Py_INCREF(value);
            int failed = as_int(key, &r, "a short row") < 0 || as_int(value, &length, "a short row's length") < 0;
            Py_DECREF(key);
            Py_DECREF(value);
            if (failed)
                goto done;
            if (r < 0 || r >= (ordered ? in_buf : rows) || length < 0 || length >= seg) {
                bad("a short row outside the table, or not shorter than a row");
                goto done;
            }
            if (r < physical)
                lengths[r] = (Py_ssize_t)length;
        }
    }
    result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(3 * rows - 2));
    if (result == NULL)
        goto done;
    {
        uint8_t *differ = (uint8_t *)PyByteArray_AS_STRING(result), *bads = differ + rows - 1, *psh = bads + rows;
        memset(differ, 0, (size_t)(3 * rows - 2));
        const uint8_t *data = (const uint8_t *)buf.buf;
        uint32_t m[MAX_HEADERS / 4], s[MAX_HEADERS / 4], prev[MAX_HEADERS / 4];
        memcpy(m, mask.buf, (size_t)words * 4); /* (copied: a buffer need not be aligned) */
        memcpy(s, step.buf, (size_t)words * 4);
        uint8_t padded[MAX_HEADERS];
        for (Py_ssize_t i = 0; i < rows; i++) {
            Py_ssize_t p = ordered ? (Py_ssize_t)int_at(&order, i) : i;
            if (p < 0 || p >= physical) { /* checked above, but code run since (an __index__) may change it */
                Py_CLEAR(result);
                bad("order names a row outside the buffer");
                goto done;
            }
            const uint8_t *row = data + base + p * seg;
            Py_ssize_t n = lengths[p];
            const uint8_t *h = row; /* the headers; a row shorter than them reads as zero-padded */
            if (n < hl) {
                memset(padded, 0, sizeof padded);
                memcpy(padded, row, (size_t)n);
                h = padded;
            }
            uint64_t ip = be_sum(h, IP_HEADER);
            /* + 0xFFFF (= 0): a row shorter than its IP header has a negative L4 length */
            uint64_t l4 = be_sum(h + 12, 8) + (uint64_t)proto + 0xFFFF + (uint64_t)n - IP_HEADER;
            if (n > IP_HEADER)
                l4 += be_sum(row + IP_HEADER, n - IP_HEADER);
            bads[i] = ip % 0xFFFF || l4 % 0xFFFF || (proto == PROTO_UDP && h[26] == 0 && h[27] == 0);
            for (Py_ssize_t w = 0; w < words; w++) {
                uint32_t v = get32(h + 4 * w);
                if (n != seg) { /* a short row is compared as if it were full */
                    if (w == 0)
                        v = (v & 0xFFFF0000u) | (uint32_t)seg;
                    else if (w == 6 && proto == PROTO_UDP)
                        v = (v & 0xFFFFu) | (uint32_t)(seg - IP_HEADER) << 16;
                }
                v &= m[w];
                if (i > 0 && (uint32_t)(v - prev[w]) != s[w])
                    differ[i - 1] = 1;
                prev[w] = v;
            }
            if (i < rows - 1)
                psh[i] = proto == PROTO_TCP && (h[33] & PSH) != 0;
        }
    }
done:
    if (lengths != stack)
        PyMem_Free(lengths);
    if (order.obj)
        PyBuffer_Release(&order);
    if (step.obj)
        PyBuffer_Release(&step);
    if (mask.obj)
        PyBuffer_Release(&mask);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"cut", (PyCFunction)(void (*)(void))cut, METH_FASTCALL, cut_doc},
    {"check", (PyCFunction)(void (*)(void))check, METH_FASTCALL, check_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tun._gso_c",
    .m_doc = "The GSO cut and the GRO checks as C loops (see tun/_gso_c.c; tun.gso_c wraps the checks).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__gso_c(void) { return PyModule_Create(&module); }
