/* lomo_torch._rounding_kernel: bf16 stochastic rounding in one pass (CPU).
 *
 * An optional speed-up of lomo_torch.rounding (built where a C compiler is at
 * hand; without it numpy makes the same bits in several passes). It steps
 * numpy's PCG64 generator (PCG XSL RR 128/64: the 128-bit LCG
 * s <- s * M + inc, output rotr64(hi(s) ^ lo(s), hi(s) >> 58)) from the given
 * state, so word j is what numpy's random_raw returns j-th; element 4j + k
 * takes word j's k-th 16 bits in memory order (numpy's uint16 view), u, and
 * for the fp32 bit pattern b of x it stores
 *
 *     out = (b + (u ^ 0x7FFF)) >> 16
 *
 * i.e. bf16's rule with the addend t = 2^15 - 1 - s (s: u read as int16). It
 * returns whether every |x| <= bf16's largest finite value (no NaN): only then
 * is out the rule's result, else the caller rounds again (x is only read).
 * One pass that reads 4 bytes and writes 2 an element; numpy needs five.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#ifndef __SIZEOF_INT128__
#error "needs unsigned __int128 (GCC or Clang on a 64-bit target); lomo_torch falls back to numpy"
#endif

#define BF16_MAX_BITS 0x7F7F0000u /* bf16's largest finite value, as fp32 bits */

/* x86-64 with glibc (ifunc) and a compiler that has target_clones: round_run
 * also in an AVX2 build, picked at load time by the CPU */
#define ROUND_RUN_CLONES
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#undef ROUND_RUN_CLONES
#define ROUND_RUN_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif

typedef unsigned __int128 u128;

/* numpy's PCG64 (pcg64.h): PCG_DEFAULT_MULTIPLIER_128, step, then output */
static const u128 PCG64_MULTIPLIER =
    ((u128)0x2360ED051FC65DA4ull << 64) | (u128)0x4385DF649FCCF645ull;

static inline uint64_t
pcg64_next(u128 *state, u128 inc)
{
    *state = *state * PCG64_MULTIPLIER + inc;
    uint64_t hi = (uint64_t)(*state >> 64), lo = (uint64_t)*state;
    uint64_t x = hi ^ lo;
    unsigned rot = (unsigned)(hi >> 58);
    return (x >> rot) | (x << ((64u - rot) & 63u));
}

/* The state `steps` words ahead (Brown's O(log steps) LCG jump, as numpy's advance). */
static u128
pcg64_ahead(u128 state, u128 inc, uint64_t steps)
{
    u128 mult = 1, plus = 0, cur_mult = PCG64_MULTIPLIER, cur_plus = inc;
    for (; steps; steps >>= 1) {
        if (steps & 1) {
            mult *= cur_mult;
            plus = plus * cur_mult + cur_plus;
        }
        cur_plus = (cur_mult + 1) * cur_plus;
        cur_mult *= cur_mult;
    }
    return mult * state + plus;
}

/* bf16's rule for `count` elements and their 16-bit noise lanes u. Returns a
 * word whose top bit is set iff some |x| exceeds bf16's largest finite value or
 * is NaN: max - |x| wraps below zero exactly there. Plain 32-bit adds, ands,
 * shifts and a signed narrowing, which only helps the compiler vectorize it
 * with SSE2 alone (GCC and Clang shift signed values arithmetically, leaving
 * each int16 pattern sign-extended: the same bits as an unsigned shift). */
ROUND_RUN_CLONES static uint32_t
round_run(const uint32_t *x, uint16_t *out, const uint16_t *u, Py_ssize_t count)
{
    uint32_t beyond = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t b = x[i];
        beyond |= BF16_MAX_BITS - (b & 0x7FFFFFFFu);
        out[i] = (uint16_t)(int16_t)((int32_t)(b + ((uint32_t)u[i] ^ 0x7FFFu)) >> 16);
    }
    return beyond;
}

#define CHAINS 4   /* independent LCG chains, stepped side by side: their multiplies overlap */
#define BLOCK 256  /* words a chain makes before they are used: CHAINS * 2 KiB, in L1 */

/* Round n elements with the words of (state, inc), word j covering elements
 * 4j..4j+3 (its 16-bit lanes in memory order, as numpy's uint16 view). The
 * words are cut into CHAINS contiguous runs (the last one takes the remainder),
 * each stepped from the state jumped ahead to its first word, a block at a
 * time. Returns whether every |x| <= bf16's largest finite value (no NaN). */
static int
bf16_round(const uint32_t *x, uint16_t *out, Py_ssize_t n, u128 state, u128 inc)
{
    Py_ssize_t words = (n + 3) / 4, run = words / CHAINS, last = words - (CHAINS - 1) * run;
    uint16_t noise[CHAINS][4 * BLOCK]; /* each word's lanes, in memory order */
    u128 s[CHAINS];
    uint32_t beyond = 0;
    for (int c = 0; c < CHAINS; c++)
        s[c] = pcg64_ahead(state, inc, (uint64_t)(c * run));
    for (Py_ssize_t j0 = 0; j0 < last; j0 += BLOCK) { /* the last run is the longest */
        Py_ssize_t m = last - j0 < BLOCK ? last - j0 : BLOCK;
        for (Py_ssize_t j = 0; j < m; j++) /* a shorter run's extra words go unused */
            for (int c = 0; c < CHAINS; c++) {
                uint64_t word = pcg64_next(&s[c], inc);
                memcpy(&noise[c][4 * j], &word, sizeof word); /* no type punning */
            }
        for (int c = 0; c < CHAINS; c++) {
            Py_ssize_t length = c < CHAINS - 1 ? run : last;
            Py_ssize_t stop = j0 + m < length ? j0 + m : length; /* the run's words used */
            Py_ssize_t start = 4 * (c * run + j0), end = 4 * (c * run + stop);
            end = end < n ? end : n;
            if (end > start)
                beyond |= round_run(x + start, out + start, noise[c], end - start);
        }
    }
    return !(beyond >> 31);
}

static int
check_buffer(const Py_buffer *buf, const char *name, Py_ssize_t itemsize, Py_ssize_t count)
{
    if (buf->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes; %zd elements of %zd bytes expected",
                     name, buf->len, count, itemsize);
        return 0;
    }
    if ((uintptr_t)buf->buf % (uintptr_t)itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s is not aligned to its %zd-byte elements", name, itemsize);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(bf16_round_into_doc,
"bf16_round_into(x, out, state_hi, state_lo, inc_hi, inc_lo) -> bool\n\n"
"x: C-contiguous fp32 values (read only); out: as many writable 16-bit\n"
"elements (the bf16 patterns); numpy PCG64's 128-bit state and increment as\n"
"high and low 64-bit halves. Stores (bits(x) + (u ^ 0x7FFF)) >> 16 in out, u\n"
"the 16-bit lanes of the generator's next words; returns True iff every x is\n"
"finite and within bf16's range (else out is not the rounding: redo it).");

static PyObject *
bf16_round_into(PyObject *self, PyObject *args)
{
    Py_buffer x, out;
    unsigned long long state_hi, state_lo, inc_hi, inc_lo; /* "K": taken modulo 2^64 */
    if (!PyArg_ParseTuple(args, "y*w*KKKK:bf16_round_into", &x, &out,
                          &state_hi, &state_lo, &inc_hi, &inc_lo))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = x.len / 4;
    if (check_buffer(&x, "x", 4, n) && check_buffer(&out, "out", 2, n)) {
        u128 state = ((u128)state_hi << 64) | state_lo, inc = ((u128)inc_hi << 64) | inc_lo;
        int in_range;
        Py_BEGIN_ALLOW_THREADS
        in_range = bf16_round((const uint32_t *)x.buf, (uint16_t *)out.buf, n, state, inc);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(in_range);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"bf16_round_into", bf16_round_into, METH_VARARGS, bf16_round_into_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rounding_kernel",
    "bf16 stochastic rounding in one pass (see lomo_torch.rounding).", -1, methods,
};

PyMODINIT_FUNC
PyInit__rounding_kernel(void)
{
    return PyModule_Create(&module);
}
