/*
 * lmrun.tokenizer._encode -- the native core of byte-level BPE encoding (GPT-2), in C.
 *
 * Source: Radford et al. 2019 (GPT-2 encoder.py: regex pre-tokenization, then the BPE merge
 * loop within each pre-token, with a cache of pre-tokens), CS336 assignment 1 (Tokenizer).
 * The same algorithm as the pure-Python Tokenizer._encode_pretokens / _bpe_loop / _bpe_heap,
 * without a Python object per pre-token or per token.
 *
 * Python interface:
 *
 *   Encoder(byte_ids, merges, cache_size)
 *     byte_ids   sequence of 256 ints: the id of the one-byte token of byte b, or -1 if none.
 *     merges     sequence of (left id, right id, result id) in rank order (rank 0 first). Where
 *                a (left, right) pair occurs twice the first (lowest) rank is used.
 *     cache_size number of distinct pre-tokens (of <= 255 UTF-8 bytes) whose ids are cached
 *                (at most 2^22); the cache is cleared when full. 0 disables it.
 *
 *   Encoder.encode(text, start=0, end=len(text), out=None) -> list[int]
 *     Ids of text[start:end] (character indices), no special tokens. Appended to `out` (a
 *     list) when given, which is returned; else a new list.
 *   Encoder.encode_to_bytearray(text, start, end, out, itemsize) -> int
 *     The same ids appended to the bytearray `out` as native-endian unsigned integers of
 *     `itemsize` (2 or 4) bytes each; returns the number of ids appended.
 *   Encoder.encode_stable(text, start, end, out) -> int
 *     For streaming: appends to the list `out` the ids of the pre-tokens of text[start:end] but
 *     the last two (pre-tokenized in the context of the whole range: final whatever text
 *     follows); returns the character index where they end (start if there are fewer than 3).
 *   Encoder.encode_utf8(data, out, specials=()) -> int
 *     For bulk encoding, without a str: the ids of the UTF-8 bytes `data` (any bytes-like
 *     object), special tokens included, written into `out` (a writable C-contiguous buffer of
 *     native unsigned 2- or 4-byte ints, numpy uint16/uint32, with room for len(data) ids: a
 *     text never has more ids than bytes); returns the number of ids written. `specials`: a
 *     sequence of (token bytes, id); where several match at one place the longest wins, as
 *     Tokenizer's special-token regex. The same ids as encode(data.decode("utf-8")) with the
 *     special tokens split out. The GIL is released while it runs, so threads that each own an
 *     Encoder encode in parallel. Raises UnicodeDecodeError (strict UTF-8, with its offset)
 *     for invalid input.
 *   Encoder.clear_cache(); Encoder.cache_len (number of cached pre-tokens).
 *
 *   pretokenize(text) -> list[str], scan(text) -> int (module functions, for tests and
 *     profiles): the GPT-2 pre-tokens of text, and their number.
 *
 *   Errors: UnicodeEncodeError for a str holding lone surrogates (the caller replaces them,
 *   as tiktoken does), MissingByteError (a ValueError) for a byte without a one-byte token,
 *   OverflowError for an id that does not fit `itemsize`, MemoryError; RuntimeError when an
 *   Encoder is called while another thread runs encode_utf8 on it (one Encoder per thread).
 *
 * Pre-tokenization is GPT-2's regex
 *     '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * written out as a scanner over the UTF-8 bytes (see piece_end). Character classes come from
 * _unicode_classes.h, generated from tiktoken's regex engine (Unicode 16.0).
 *
 * Merging (GPT-2's bpe loop): repeatedly find the adjacent pair with the lowest merge rank and
 * merge all its occurrences left to right; pre-tokens of >= HEAP_MIN_BYTES bytes use a
 * min-heap of (rank, position) over a linked list (O(n log n), same result). Pair ranks live
 * in an open-addressing table keyed by (left << 32 | right).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_unicode_classes.h"

enum { C_OTHER = 0, C_L = 1, C_N = 2, C_WS = 3 };

#define HEAP_MIN_BYTES 64
#define CACHE_MAX_BYTES 255
#define CACHE_MAX_ENTRIES (1 << 22) /* a larger cache_size is capped (2 table slots of 24 bytes an entry) */
#define NO_RANK INT32_MAX
#define INTS_MAX (1 << 24) /* Python ints of ids below this are cached */
#define BUF_KEEP (1 << 20)  /* ids: a larger output buffer is freed after the call */
#define HEAP_KEEP (1 << 16) /* bytes: larger merge scratch is freed after the call */

static PyObject *MissingByteError;

/* ------------------------------------------------------------------ character classes */

static uint8_t ascii_class[128];

/* class of the (valid UTF-8) character at s, its length in *len */
static inline int char_class(const uint8_t *s, Py_ssize_t *len) {
    uint32_t c = s[0];
    if (c < 0x80) {
        *len = 1;
        return ascii_class[c];
    }
    uint32_t cp;
    if (c < 0xE0) {
        *len = 2;
        cp = ((c & 0x1F) << 6) | (s[1] & 0x3F);
    } else if (c < 0xF0) {
        *len = 3;
        cp = ((c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    } else {
        *len = 4;
        cp = ((c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        if (cp >= 0x110000) cp = 0xFFFD; /* cannot happen for Python's UTF-8 */
    }
    return uc_stage2[(uint32_t)uc_stage1[cp >> 8] * 256 + (cp & 255)];
}

/* End (exclusive) of the pre-token that starts at i < n: the first alternative of GPT-2's
 * pattern that matches at i, as the regex engines take it. */
static inline Py_ssize_t piece_end(const uint8_t *s, Py_ssize_t n, Py_ssize_t i) {
    uint8_t b = s[i];
    if (b == '\'' && i + 1 < n) { /* '(?:[sdmt]|ll|ve|re) */
        uint8_t b1 = s[i + 1];
        if (b1 == 's' || b1 == 'd' || b1 == 'm' || b1 == 't') return i + 2;
        if (i + 2 < n) {
            uint8_t b2 = s[i + 2];
            if ((b1 == 'l' && b2 == 'l') || (b1 == 'v' && b2 == 'e') || (b1 == 'r' && b2 == 'e')) return i + 3;
        }
    }
    Py_ssize_t len, j = i;
    int c;
    if (b < 0x80) {
        c = ascii_class[b];
        len = 1;
    } else {
        c = char_class(s + i, &len);
    }
    if (b == ' ' && i + 1 < n) { /* " ?" before a letter, number or other run */
        Py_ssize_t l1;
        int c1 = char_class(s + i + 1, &l1);
        if (c1 != C_WS) {
            j = i + 1;
            c = c1;
            len = l1;
        }
    }
    if (c != C_WS) { /* \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+ from j */
        j += len;
        while (j < n) {
            uint8_t x = s[j];
            if (x < 0x80) {
                if (ascii_class[x] != c) break;
                j++;
            } else {
                Py_ssize_t l;
                if (char_class(s + j, &l) != c) break;
                j += l;
            }
        }
        return j;
    }
    /* whitespace: \s+(?!\S) takes the run less its last character when a non-space follows
     * (that character then starts the next pre-token), else the whole run; \s+ one character */
    Py_ssize_t last = i;
    j = i + len;
    while (j < n) {
        Py_ssize_t l;
        if (char_class(s + j, &l) != C_WS) break;
        last = j;
        j += l;
    }
    if (j == n) return n;
    return last > i ? last : j;
}

/* ------------------------------------------------------------------ the encoder object */

typedef struct {
    uint64_t hash;
    uint32_t key_off, ids_off;
    uint16_t key_len, nids; /* key_len == 0: empty slot */
} CacheSlot;

typedef struct {
    PyObject_HEAD
    int32_t byte_id[256];
    /* (left << 32 | right) -> rank; empty key = UINT64_MAX */
    uint64_t *pkeys;
    int32_t *pranks;
    uint64_t pmask;
    int pshift; /* 64 - log2(table size) */
    int32_t *merge_new; /* rank -> result id */
    Py_ssize_t nmerges;
    int32_t max_id;
    PyObject **ints; /* cached Python ints 0..max_id */
    PyObject *args;  /* the constructor's arguments, for pickling */
    /* pre-token cache */
    CacheSlot *slots;
    uint64_t cmask;
    Py_ssize_t centries, cmax;
    uint8_t *ckeys;
    size_t ckeys_len, ckeys_cap;
    int32_t *cids;
    size_t cids_len, cids_cap;
    /* scratch */
    int32_t *buf;
    size_t buf_len, buf_cap; /* output ids of one call */
    uint64_t *heap;
    int32_t *htok, *hnxt, *hprv, *hbatch;
    size_t hcap;
    /* an error of the core functions, which may run without the GIL: raised by raise_core_error */
    int err;
    uint8_t err_byte;
    int busy; /* encode_utf8 is running without the GIL */
} Encoder;

enum { ERR_NONE = 0, ERR_NOMEM, ERR_TOOLONG, ERR_HEAP, ERR_MISSING };

/* turn E->err into a Python exception (the GIL held); returns -1 */
static int raise_core_error(Encoder *E) {
    switch (E->err) {
    case ERR_NOMEM:
        PyErr_NoMemory();
        break;
    case ERR_TOOLONG:
        PyErr_SetString(PyExc_ValueError, "a pre-token of 2 GiB or more cannot be encoded");
        break;
    case ERR_HEAP:
        PyErr_SetString(PyExc_RuntimeError, "internal error: BPE heap overflow");
        break;
    case ERR_MISSING:
        PyErr_Format(MissingByteError, "byte 0x%02x has no token in the vocabulary", E->err_byte);
        break;
    default:
        PyErr_SetString(PyExc_SystemError, "encoder failed without an error");
    }
    E->err = ERR_NONE;
    return -1;
}

/* refuse a call while encode_utf8 runs on E in another thread (the GIL released) */
static int check_idle(Encoder *E) {
    if (E->busy) {
        PyErr_SetString(PyExc_RuntimeError, "this Encoder is in use by another thread (make one Encoder per thread)");
        return -1;
    }
    return 0;
}

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static inline int32_t pair_rank(const Encoder *E, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint64_t i = (key * 0x9E3779B97F4A7C15ULL) >> E->pshift;
    for (;;) {
        uint64_t k = E->pkeys[i];
        if (k == key) return E->pranks[i];
        if (k == UINT64_MAX) return NO_RANK;
        i = (i + 1) & E->pmask;
    }
}

static inline uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0xbf58476d1ce4e5b9ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    uint64_t v = 0;
    for (size_t k = 0; k < n; k++) v |= (uint64_t)p[k] << (8 * k);
    h = (h ^ v) * 0x94d049bb133111ebULL;
    return mix64(h);
}

static int buf_reserve(Encoder *E, size_t extra) {
    if (E->buf_len + extra <= E->buf_cap) return 0;
    size_t cap = E->buf_cap ? E->buf_cap : 1024;
    while (cap < E->buf_len + extra) cap *= 2;
    int32_t *p = realloc(E->buf, cap * sizeof(int32_t));
    if (!p) {
        E->err = ERR_NOMEM;
        return -1;
    }
    E->buf = p;
    E->buf_cap = cap;
    return 0;
}

static int heap_reserve(Encoder *E, size_t n) {
    if (n <= E->hcap) return 0;
    size_t cap = E->hcap ? E->hcap : 256;
    while (cap < n) cap *= 2;
    /* each pair position is pushed at most once initially and once per merge next to it */
    uint64_t *h = realloc(E->heap, 3 * cap * sizeof(uint64_t));
    if (h) E->heap = h;
    int32_t *t = realloc(E->htok, cap * sizeof(int32_t));
    if (t) E->htok = t;
    int32_t *x = realloc(E->hnxt, cap * sizeof(int32_t));
    if (x) E->hnxt = x;
    int32_t *v = realloc(E->hprv, cap * sizeof(int32_t));
    if (v) E->hprv = v;
    /* a batch holds the heap entries of one rank: at most the heap size */
    int32_t *bt = realloc(E->hbatch, 3 * cap * sizeof(int32_t));
    if (bt) E->hbatch = bt;
    if (!h || !t || !x || !v || !bt) {
        E->err = ERR_NOMEM;
        return -1;
    }
    E->hcap = cap;
    return 0;
}

static inline void heap_push(uint64_t *heap, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i) {
        size_t p = (i - 1) >> 1;
        if (heap[p] <= v) break;
        heap[i] = heap[p];
        i = p;
    }
    heap[i] = v;
}

static inline uint64_t heap_pop(uint64_t *heap, size_t *n) {
    uint64_t top = heap[0];
    uint64_t v = heap[--(*n)];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && heap[c + 1] < heap[c]) c++;
        if (heap[c] >= v) break;
        heap[i] = heap[c];
        i = c;
    }
    if (m) heap[i] = v;
    return top;
}

/* BPE of ids[0..n) in place (GPT-2's loop); returns the new length */
static Py_ssize_t bpe_small(const Encoder *E, int32_t *ids, Py_ssize_t n) {
    int32_t rk[HEAP_MIN_BYTES];
    for (Py_ssize_t i = 0; i + 1 < n; i++) rk[i] = pair_rank(E, ids[i], ids[i + 1]);
    while (n > 1) {
        int32_t best = NO_RANK;
        for (Py_ssize_t i = 0; i + 1 < n; i++)
            if (rk[i] < best) best = rk[i];
        if (best == NO_RANK) break;
        int32_t nw = E->merge_new[best];
        /* merge every occurrence of the pair of rank `best`, left to right; a pair's rank
         * identifies it, so rk[i] == best means (ids[i], ids[i+1]) is that pair */
        Py_ssize_t w = 0, i = 0;
        while (i < n) {
            if (i + 1 < n && rk[i] == best) {
                ids[w] = nw;
                rk[w] = -1; /* recompute below (also marks the pair to its left) */
                if (w) rk[w - 1] = -1;
                i += 2;
            } else {
                ids[w] = ids[i];
                rk[w] = rk[i];
                i += 1;
            }
            w++;
        }
        n = w;
        for (Py_ssize_t k = 0; k + 1 < n; k++)
            if (rk[k] == -1) rk[k] = pair_rank(E, ids[k], ids[k + 1]);
    }
    return n;
}

/* O(n log n) BPE of ids[0..n) in place, same result as bpe_small (see Tokenizer._bpe_heap) */
static Py_ssize_t bpe_heap(Encoder *E, int32_t *ids, Py_ssize_t n) {
    if (heap_reserve(E, (size_t)n) < 0) return -1;
    int32_t *tok = E->htok, *nxt = E->hnxt, *prv = E->hprv, *batch = E->hbatch;
    uint64_t *heap = E->heap;
    size_t nh = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        tok[i] = ids[i];
        nxt[i] = (int32_t)(i + 1 < n ? i + 1 : -1);
        prv[i] = (int32_t)(i - 1);
    }
    for (Py_ssize_t i = 0; i + 1 < n; i++) {
        int32_t r = pair_rank(E, tok[i], tok[i + 1]);
        if (r != NO_RANK) heap[nh++] = ((uint64_t)(uint32_t)r << 32) | (uint32_t)i;
    }
    /* heapify */
    for (size_t k = nh / 2; k-- > 0;) {
        uint64_t v = heap[k];
        size_t i = k;
        for (;;) {
            size_t c = 2 * i + 1;
            if (c >= nh) break;
            if (c + 1 < nh && heap[c + 1] < heap[c]) c++;
            if (heap[c] >= v) break;
            heap[i] = heap[c];
            i = c;
        }
        heap[i] = v;
    }
    /* a round takes all entries of the lowest rank (in position order) and merges the valid
     * ones left to right; pairs created meanwhile have another rank and wait in the heap */
    while (nh) {
        uint32_t r = (uint32_t)(heap[0] >> 32);
        int32_t nw = E->merge_new[r];
        /* take the whole batch first: merges below may push pairs of a lower rank */
        size_t nb = 0;
        while (nh && (uint32_t)(heap[0] >> 32) == r) batch[nb++] = (int32_t)(uint32_t)heap_pop(heap, &nh);
        for (size_t q = 0; q < nb; q++) {
            int32_t i = batch[q];
            int32_t j = nxt[i];
            if (tok[i] < 0 || j < 0 || pair_rank(E, tok[i], tok[j]) != (int32_t)r) continue;
            tok[i] = nw;
            tok[j] = -1;
            int32_t k = nxt[j];
            nxt[i] = k;
            if (k >= 0) {
                prv[k] = i;
                int32_t rr = pair_rank(E, nw, tok[k]);
                if (rr != NO_RANK) {
                    if (nh >= 3 * E->hcap) return -2;
                    heap_push(heap, &nh, ((uint64_t)(uint32_t)rr << 32) | (uint32_t)i);
                }
            }
            int32_t p = prv[i];
            if (p >= 0) {
                int32_t rr = pair_rank(E, tok[p], nw);
                if (rr != NO_RANK) {
                    if (nh >= 3 * E->hcap) return -2;
                    heap_push(heap, &nh, ((uint64_t)(uint32_t)rr << 32) | (uint32_t)p);
                }
            }
        }
    }
    Py_ssize_t w = 0;
    for (int32_t i = 0; i >= 0; i = nxt[i]) ids[w++] = tok[i];
    return w;
}

static void cache_clear(Encoder *E) {
    if (E->slots && E->centries) memset(E->slots, 0, (E->cmask + 1) * sizeof(CacheSlot));
    E->centries = 0;
    E->ckeys_len = 0;
    E->cids_len = 0;
}

static int cache_put(Encoder *E, uint64_t h, const uint8_t *key, Py_ssize_t klen, const int32_t *ids, Py_ssize_t nids) {
    if (E->centries >= E->cmax) cache_clear(E);
    if (E->ckeys_len + (size_t)klen > E->ckeys_cap) {
        size_t cap = E->ckeys_cap ? E->ckeys_cap * 2 : 1 << 20;
        uint8_t *p = realloc(E->ckeys, cap);
        if (!p) return 0; /* no room: just do not cache */
        E->ckeys = p;
        E->ckeys_cap = cap;
    }
    if (E->cids_len + (size_t)nids > E->cids_cap) {
        size_t cap = E->cids_cap ? E->cids_cap * 2 : 1 << 18;
        int32_t *p = realloc(E->cids, cap * sizeof(int32_t));
        if (!p) return 0;
        E->cids = p;
        E->cids_cap = cap;
    }
    if (E->ckeys_len + (size_t)klen > UINT32_MAX || E->cids_len + (size_t)nids > UINT32_MAX) return 0;
    uint64_t i = h & E->cmask;
    while (E->slots[i].key_len) i = (i + 1) & E->cmask;
    CacheSlot *s = &E->slots[i];
    s->hash = h;
    s->key_off = (uint32_t)E->ckeys_len;
    s->key_len = (uint16_t)klen;
    s->ids_off = (uint32_t)E->cids_len;
    s->nids = (uint16_t)nids;
    memcpy(E->ckeys + E->ckeys_len, key, (size_t)klen);
    E->ckeys_len += (size_t)klen;
    memcpy(E->cids + E->cids_len, ids, (size_t)nids * sizeof(int32_t));
    E->cids_len += (size_t)nids;
    E->centries++;
    return 0;
}

/* a == b for n bytes; pre-tokens are short, so no call to memcmp for them */
static inline int same_bytes(const uint8_t *a, const uint8_t *b, size_t n) {
    if (n > 16) return memcmp(a, b, n) == 0;
    for (size_t k = 0; k < n; k++)
        if (a[k] != b[k]) return 0;
    return 1;
}

/* append the ids of the pre-token p[0..len) to E->buf */
static int encode_piece(Encoder *E, const uint8_t *p, Py_ssize_t len) {
    if (len == 1) {
        int32_t id = E->byte_id[p[0]];
        if (id < 0) goto missing;
        if (buf_reserve(E, 1) < 0) return -1;
        E->buf[E->buf_len++] = id;
        return 0;
    }
    uint64_t h = 0;
    int cacheable = E->cmax > 0 && len <= CACHE_MAX_BYTES;
    if (cacheable) {
        h = hash_bytes(p, (size_t)len);
        uint64_t i = h & E->cmask;
        for (;;) {
            const CacheSlot *s = &E->slots[i];
            if (!s->key_len) break;
            if (s->hash == h && s->key_len == len && same_bytes(E->ckeys + s->key_off, p, (size_t)len)) {
                if (buf_reserve(E, s->nids) < 0) return -1;
                memcpy(E->buf + E->buf_len, E->cids + s->ids_off, s->nids * sizeof(int32_t));
                E->buf_len += s->nids;
                return 0;
            }
            i = (i + 1) & E->cmask;
        }
    }
    if (len >= INT32_MAX) {
        E->err = ERR_TOOLONG;
        return -1;
    }
    if (buf_reserve(E, (size_t)len) < 0) return -1;
    int32_t *ids = E->buf + E->buf_len;
    for (Py_ssize_t k = 0; k < len; k++) {
        int32_t id = E->byte_id[p[k]];
        if (id < 0) {
            p += k;
            goto missing;
        }
        ids[k] = id;
    }
    Py_ssize_t m;
    if (len < HEAP_MIN_BYTES) {
        m = bpe_small(E, ids, len);
    } else {
        m = bpe_heap(E, ids, len);
        if (m == -2) {
            E->err = ERR_HEAP;
            return -1;
        }
        if (m < 0) return -1;
    }
    if (cacheable) cache_put(E, h, p, len, ids, m);
    E->buf_len += (size_t)m;
    return 0;
missing:
    E->err = ERR_MISSING;
    E->err_byte = p[0];
    return -1;
}

/* encode text[start:end] (character indices) into E->buf (not cleared). With `cut`: only the
 * pre-tokens before the last two (pre-tokenized in the context of the whole range), and *cut is
 * set to the character index where the encoded part ends (start if fewer than three). */
static int encode_text(Encoder *E, PyObject *text, Py_ssize_t start, Py_ssize_t end, Py_ssize_t *cut) {
    Py_ssize_t tlen = PyUnicode_GET_LENGTH(text);
    if (start < 0) start = 0;
    if (end > tlen) end = tlen;
    if (cut) *cut = start < tlen ? start : tlen;
    if (start >= end) return 0;
    int ascii = PyUnicode_IS_ASCII(text);
    PyObject *sub = NULL;
    const uint8_t *s;
    Py_ssize_t n;
    if (ascii) {
        s = (const uint8_t *)PyUnicode_DATA(text) + start;
        n = end - start;
    } else {
        if (start > 0 || end < tlen) {
            sub = PyUnicode_Substring(text, start, end);
            if (!sub) return -1;
            text = sub;
        }
        const char *u = PyUnicode_AsUTF8AndSize(text, &n);
        if (!u) {
            Py_XDECREF(sub);
            return -1;
        }
        s = (const uint8_t *)u;
    }
    Py_ssize_t limit = n; /* encode the pre-tokens that start before this byte */
    if (cut) {
        Py_ssize_t i = 0, prev = 0, last = 0, count = 0;
        while (i < n) {
            prev = last;
            last = i;
            i = piece_end(s, n, i);
            count++;
        }
        limit = count > 2 ? prev : 0;
        Py_ssize_t chars = limit;
        if (!ascii) {
            chars = 0;
            for (Py_ssize_t k = 0; k < limit; k++) chars += (s[k] & 0xC0) != 0x80;
        }
        *cut = start + chars;
    }
    Py_ssize_t i = 0;
    int rc = 0;
    while (i < limit) {
        Py_ssize_t j = piece_end(s, n, i);
        if (encode_piece(E, s + i, j - i) < 0) {
            rc = raise_core_error(E);
            break;
        }
        i = j;
    }
    Py_XDECREF(sub);
    return rc;
}

static int parse_range(PyObject *text, PyObject *ostart, PyObject *oend, Py_ssize_t *start, Py_ssize_t *end) {
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "encode needs a str, got %.100s", Py_TYPE(text)->tp_name);
        return -1;
    }
    *start = 0;
    *end = PyUnicode_GET_LENGTH(text);
    if (ostart && ostart != Py_None) {
        *start = PyLong_AsSsize_t(ostart);
        if (*start == -1 && PyErr_Occurred()) return -1;
    }
    if (oend && oend != Py_None) {
        *end = PyLong_AsSsize_t(oend);
        if (*end == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* a new reference to the Python int of id; ids below INTS_MAX are made once and shared */
static inline PyObject *int_of(Encoder *E, int32_t id) {
    if (E->ints && id <= E->max_id) {
        PyObject *v = E->ints[id];
        if (!v) {
            v = E->ints[id] = PyLong_FromLong(id);
            if (!v) return NULL;
        }
        Py_INCREF(v);
        return v;
    }
    return PyLong_FromLong(id);
}

static PyObject *encode_ids_to_list(Encoder *E, const int32_t *ids, size_t n, PyObject *out);

/* the id buffer, now the caller's (capacity in *cap); E gets a new one on its next call */
static int32_t *take_buf(Encoder *E, size_t *cap) {
    int32_t *ids = E->buf;
    *cap = E->buf_cap;
    E->buf = NULL;
    E->buf_len = E->buf_cap = 0;
    return ids;
}

/* hand a taken buffer back: kept for the next call unless E has made a new one meanwhile or it
 * is large (memory held between calls stays small); drop large merge scratch too */
static void give_back_buf(Encoder *E, int32_t *ids, size_t cap) {
    if (!E->buf && cap <= BUF_KEEP) {
        E->buf = ids;
        E->buf_cap = cap;
        E->buf_len = 0;
    } else {
        free(ids);
    }
    if (E->hcap > HEAP_KEEP) {
        free(E->heap);
        free(E->htok);
        free(E->hnxt);
        free(E->hprv);
        free(E->hbatch);
        E->heap = NULL;
        E->htok = E->hnxt = E->hprv = E->hbatch = NULL;
        E->hcap = 0;
    }
}

static PyObject *Encoder_encode(Encoder *E, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"text", "start", "end", "out", NULL};
    PyObject *text, *ostart = NULL, *oend = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOO:encode", kwlist, &text, &ostart, &oend, &out)) return NULL;
    if (check_idle(E) < 0) return NULL;
    Py_ssize_t start, end;
    if (parse_range(text, ostart, oend, &start, &end) < 0) return NULL;
    if (out == Py_None) out = NULL;
    if (out && !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return NULL;
    }
    E->buf_len = 0;
    if (encode_text(E, text, start, end, NULL) < 0) return NULL;
    size_t n = E->buf_len;
    /* own the ids while Python objects are made: a garbage collection there may run code
     * that encodes with this Encoder again (another thread, a finalizer) */
    size_t cap;
    int32_t *ids = take_buf(E, &cap);
    PyObject *list = encode_ids_to_list(E, ids, n, out);
    give_back_buf(E, ids, cap);
    return list;
}

static PyObject *encode_ids_to_list(Encoder *E, const int32_t *ids, size_t n, PyObject *out) {
    PyObject *list;
    Py_ssize_t base = 0;
    if (out) {
        base = PyList_GET_SIZE(out);
        /* grow the list by n items (None placeholders are overwritten below) */
        PyObject *tail = PyList_New((Py_ssize_t)n);
        if (!tail) return NULL;
        for (size_t k = 0; k < n; k++) {
            PyObject *v = int_of(E, ids[k]);
            if (!v) {
                Py_DECREF(tail);
                return NULL;
            }
            PyList_SET_ITEM(tail, (Py_ssize_t)k, v);
        }
        if (PyList_SetSlice(out, base, base, tail) < 0) {
            Py_DECREF(tail);
            return NULL;
        }
        Py_DECREF(tail);
        Py_INCREF(out);
        return out;
    }
    list = PyList_New((Py_ssize_t)n);
    if (!list) return NULL;
    for (size_t k = 0; k < n; k++) {
        PyObject *v = int_of(E, ids[k]);
        if (!v) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, v);
    }
    return list;
}

/* ids as native unsigned ints of itemsize (2 or 4) bytes at dst (ids already checked to fit) */
static void store_ids(void *dst, const int32_t *ids, size_t n, int itemsize) {
    if (itemsize == 4) {
        memcpy(dst, ids, n * 4);
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (size_t k = 0; k < n; k++) d[k] = (uint16_t)ids[k];
    }
}

static PyObject *Encoder_encode_to_bytearray(Encoder *E, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"text", "start", "end", "out", "itemsize", NULL};
    PyObject *text, *ostart, *oend, *out;
    int itemsize;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOi:encode_to_bytearray", kwlist, &text, &ostart, &oend, &out,
                                     &itemsize))
        return NULL;
    if (check_idle(E) < 0) return NULL;
    Py_ssize_t start, end;
    if (parse_range(text, ostart, oend, &start, &end) < 0) return NULL;
    if (!PyByteArray_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a bytearray");
        return NULL;
    }
    if (itemsize != 2 && itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "itemsize must be 2 or 4");
        return NULL;
    }
    if (itemsize == 2 && E->max_id > 0xFFFF) {
        PyErr_Format(PyExc_OverflowError, "token id %d does not fit 2 bytes", (int)E->max_id);
        return NULL;
    }
    E->buf_len = 0;
    if (encode_text(E, text, start, end, NULL) < 0) return NULL;
    size_t n = E->buf_len, cap;
    int32_t *ids = take_buf(E, &cap);
    Py_ssize_t old = PyByteArray_GET_SIZE(out);
    if (PyByteArray_Resize(out, old + (Py_ssize_t)(n * (size_t)itemsize)) < 0) {
        give_back_buf(E, ids, cap);
        return NULL;
    }
    store_ids(PyByteArray_AS_STRING(out) + old, ids, n, itemsize);
    give_back_buf(E, ids, cap);
    return PyLong_FromSize_t(n);
}

static PyObject *Encoder_encode_stable(Encoder *E, PyObject *args) {
    PyObject *text, *ostart, *oend, *out;
    if (!PyArg_ParseTuple(args, "OOOO:encode_stable", &text, &ostart, &oend, &out)) return NULL;
    if (check_idle(E) < 0) return NULL;
    Py_ssize_t start, end, cut;
    if (parse_range(text, ostart, oend, &start, &end) < 0) return NULL;
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return NULL;
    }
    E->buf_len = 0;
    if (encode_text(E, text, start, end, &cut) < 0) return NULL;
    size_t n = E->buf_len, cap;
    int32_t *ids = take_buf(E, &cap);
    PyObject *list = encode_ids_to_list(E, ids, n, out);
    give_back_buf(E, ids, cap);
    if (!list) return NULL;
    Py_DECREF(list); /* == out */
    return PyLong_FromSsize_t(cut);
}

/* ------------------------------------------------------------------ bulk encoding of UTF-8 bytes */

/* Offset of the first byte that is not part of valid UTF-8 (as Python's strict decoder judges:
 * no overlong forms, no surrogates, nothing above U+10FFFF), or -1 when all of s[0..n) is valid;
 * *bad_end and *reason describe the error as UnicodeDecodeError does. Runs without the GIL. */
static Py_ssize_t utf8_error(const uint8_t *s, Py_ssize_t n, Py_ssize_t *bad_end, const char **reason) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + 8 <= n) { /* 8 ASCII bytes at a time */
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        Py_ssize_t need;
        uint8_t lo = 0x80, hi = 0xBF; /* the range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            *bad_end = i + 1;
            *reason = "invalid start byte";
            return i;
        }
        for (Py_ssize_t k = 1; k <= need; k++) {
            if (i + k >= n) {
                *bad_end = n;
                *reason = "unexpected end of data";
                return i;
            }
            uint8_t b = s[i + k];
            if (k == 1 ? (b < lo || b > hi) : (b & 0xC0) != 0x80) {
                *bad_end = i + k;
                *reason = "invalid continuation byte";
                return i;
            }
        }
        i += need + 1;
    }
    return -1;
}

typedef struct {
    const uint8_t *bytes;
    Py_ssize_t len;
    int32_t id;
    Py_ssize_t next; /* where it next occurs at or after the search position (n: nowhere) */
} Special;

static Py_ssize_t find_bytes(const uint8_t *s, Py_ssize_t n, Py_ssize_t from, const uint8_t *t, Py_ssize_t m) {
    if (m <= 0) return n;
    while (from + m <= n) {
        const uint8_t *p = memchr(s + from, t[0], (size_t)(n - m + 1 - from));
        if (!p) return n;
        Py_ssize_t at = p - s;
        if (memcmp(p, t, (size_t)m) == 0) return at;
        from = at + 1;
    }
    return n;
}

/* the ids of s[0..n) (valid UTF-8) into E->buf, special tokens split out (leftmost match, the
 * longest where several start at one place); runs without the GIL; -1 with E->err set */
static int encode_utf8_core(Encoder *E, const uint8_t *s, Py_ssize_t n, Special *sp, Py_ssize_t nsp) {
    for (Py_ssize_t k = 0; k < nsp; k++) sp[k].next = find_bytes(s, n, 0, sp[k].bytes, sp[k].len);
    Py_ssize_t pos = 0;
    while (pos < n) {
        Py_ssize_t at = n, best = -1;
        for (Py_ssize_t k = 0; k < nsp; k++) {
            if (sp[k].next < pos) sp[k].next = find_bytes(s, n, pos, sp[k].bytes, sp[k].len);
            if (sp[k].next < at || (sp[k].next == at && best >= 0 && sp[k].len > sp[best].len)) {
                at = sp[k].next;
                best = k;
            }
        }
        const uint8_t *seg = s + pos;
        Py_ssize_t len = at - pos, i = 0;
        while (i < len) {
            Py_ssize_t j = piece_end(seg, len, i);
            if (encode_piece(E, seg + i, j - i) < 0) return -1;
            i = j;
        }
        if (best < 0) break;
        if (buf_reserve(E, 1) < 0) return -1;
        E->buf[E->buf_len++] = sp[best].id;
        pos = at + sp[best].len;
    }
    return 0;
}

static PyObject *Encoder_encode_utf8(Encoder *E, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"data", "out", "specials", NULL};
    PyObject *odata, *oout, *ospecials = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:encode_utf8", kwlist, &odata, &oout, &ospecials)) return NULL;
    if (check_idle(E) < 0) return NULL;
    Py_buffer data, out;
    if (PyObject_GetBuffer(odata, &data, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(oout, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL, *seq = NULL;
    Special *sp = NULL;
    Py_ssize_t nsp = 0;
    int itemsize = (int)out.itemsize;
    if (itemsize != 2 && itemsize != 4) {
        PyErr_Format(PyExc_ValueError, "out must hold 2- or 4-byte ints (numpy uint16 or uint32), not %d-byte items",
                     itemsize);
        goto done;
    }
    int32_t limit = itemsize == 2 ? 0xFFFF : INT32_MAX;
    if (E->max_id > limit) {
        PyErr_Format(PyExc_OverflowError, "token id %d does not fit %d bytes", (int)E->max_id, itemsize);
        goto done;
    }
    if (ospecials && ospecials != Py_None) {
        seq = PySequence_Fast(ospecials, "specials must be a sequence of (bytes, id)");
        if (!seq) goto done;
        nsp = PySequence_Fast_GET_SIZE(seq);
        sp = calloc(nsp ? (size_t)nsp : 1, sizeof(Special));
        if (!sp) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t k = 0; k < nsp; k++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, k), *tb;
            long id;
            if (!PyArg_ParseTuple(item, "Sl:specials", &tb, &id)) goto done;
            if (id < 0 || id > limit) {
                PyErr_Format(PyExc_OverflowError, "special token id %ld does not fit %d bytes", id, itemsize);
                goto done;
            }
            sp[k].bytes = (const uint8_t *)PyBytes_AS_STRING(tb); /* alive: seq holds the tuples */
            sp[k].len = PyBytes_GET_SIZE(tb);
            sp[k].id = (int32_t)id;
        }
    }
    const uint8_t *s = (const uint8_t *)data.buf;
    Py_ssize_t n = data.len, bad_end = 0;
    const char *reason = NULL;
    Py_ssize_t bad;
    int rc;
    E->busy = 1;
    E->buf_len = 0;
    Py_BEGIN_ALLOW_THREADS
    bad = utf8_error(s, n, &bad_end, &reason);
    rc = bad < 0 ? encode_utf8_core(E, s, n, sp, nsp) : 0;
    Py_END_ALLOW_THREADS
    E->busy = 0;
    if (bad >= 0) {
        PyObject *exc = PyUnicodeDecodeError_Create("utf-8", (const char *)s, n, bad, bad_end, reason);
        if (exc) {
            PyErr_SetObject(PyExc_UnicodeDecodeError, exc);
            Py_DECREF(exc);
        }
        goto done;
    }
    if (rc < 0) {
        raise_core_error(E);
        goto done;
    }
    size_t count = E->buf_len;
    if ((Py_ssize_t)count > out.len / itemsize) {
        PyErr_Format(PyExc_ValueError, "out has room for %zd ids, the text has %zu", out.len / itemsize, count);
        goto done;
    }
    store_ids(out.buf, E->buf, count, itemsize);
    result = PyLong_FromSize_t(count);
done:
    free(sp);
    Py_XDECREF(seq);
    PyBuffer_Release(&out);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *Encoder_clear_cache(Encoder *E, PyObject *Py_UNUSED(ignored)) {
    if (check_idle(E) < 0) return NULL;
    cache_clear(E);
    Py_RETURN_NONE;
}

static PyObject *Encoder_get_cache_len(Encoder *E, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(E->centries);
}

static PyObject *Encoder_reduce(Encoder *E, PyObject *Py_UNUSED(ignored)) {
    if (!E->args) {
        PyErr_SetString(PyExc_TypeError, "cannot pickle an uninitialized Encoder");
        return NULL;
    }
    return Py_BuildValue("(OO)", (PyObject *)Py_TYPE(E), E->args);
}

static void Encoder_dealloc(Encoder *E) {
    Py_XDECREF(E->args);
    free(E->pkeys);
    free(E->pranks);
    free(E->merge_new);
    if (E->ints) {
        for (int32_t i = 0; i <= E->max_id; i++) Py_XDECREF(E->ints[i]);
        free(E->ints);
    }
    free(E->slots);
    free(E->ckeys);
    free(E->cids);
    free(E->buf);
    free(E->heap);
    free(E->htok);
    free(E->hnxt);
    free(E->hprv);
    free(E->hbatch);
    Py_TYPE(E)->tp_free((PyObject *)E);
}

static int read_int32(PyObject *o, int32_t *v, int32_t lo) {
    long x = PyLong_AsLong(o);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < lo || x > INT32_MAX - 1) {
        PyErr_Format(PyExc_ValueError, "token id %ld out of range", x);
        return -1;
    }
    *v = (int32_t)x;
    return 0;
}

static int Encoder_init(Encoder *E, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"byte_ids", "merges", "cache_size", NULL};
    PyObject *obytes, *omerges;
    Py_ssize_t cache_size = 1 << 17;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|n:Encoder", kwlist, &obytes, &omerges, &cache_size)) return -1;
    if (E->pkeys) {
        PyErr_SetString(PyExc_TypeError, "Encoder is already initialized");
        return -1;
    }
    PyObject *fb = PySequence_Fast(obytes, "byte_ids must be a sequence");
    if (!fb) return -1;
    if (PySequence_Fast_GET_SIZE(fb) != 256) {
        Py_DECREF(fb);
        PyErr_SetString(PyExc_ValueError, "byte_ids must have 256 entries");
        return -1;
    }
    int32_t max_id = 0;
    for (int b = 0; b < 256; b++) {
        if (read_int32(PySequence_Fast_GET_ITEM(fb, b), &E->byte_id[b], -1) < 0) {
            Py_DECREF(fb);
            return -1;
        }
        if (E->byte_id[b] > max_id) max_id = E->byte_id[b];
    }
    Py_DECREF(fb);
    PyObject *fm = PySequence_Fast(omerges, "merges must be a sequence");
    if (!fm) return -1;
    Py_ssize_t nm = PySequence_Fast_GET_SIZE(fm);
    uint64_t cap = 16;
    int bits = 4;
    while (cap < (uint64_t)nm * 2 + 2) {
        cap *= 2;
        bits++;
    }
    E->pmask = cap - 1;
    E->pshift = 64 - bits;
    E->pkeys = malloc(cap * sizeof(uint64_t));
    E->pranks = malloc(cap * sizeof(int32_t));
    E->merge_new = malloc((size_t)(nm ? nm : 1) * sizeof(int32_t));
    if (!E->pkeys || !E->pranks || !E->merge_new) {
        Py_DECREF(fm);
        PyErr_NoMemory();
        return -1;
    }
    memset(E->pkeys, 0xFF, cap * sizeof(uint64_t));
    for (Py_ssize_t r = 0; r < nm; r++) {
        PyObject *t = PySequence_Fast_GET_ITEM(fm, r);
        int32_t v[3];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
            Py_DECREF(fm);
            PyErr_SetString(PyExc_TypeError, "each merge must be a tuple (left id, right id, result id)");
            return -1;
        }
        for (int k = 0; k < 3; k++)
            if (read_int32(PyTuple_GET_ITEM(t, k), &v[k], 0) < 0) {
                Py_DECREF(fm);
                return -1;
            }
        E->merge_new[r] = v[2];
        if (v[2] > max_id) max_id = v[2];
        if (v[0] > max_id) max_id = v[0];
        if (v[1] > max_id) max_id = v[1];
        uint64_t key = ((uint64_t)(uint32_t)v[0] << 32) | (uint32_t)v[1];
        uint64_t i = (key * 0x9E3779B97F4A7C15ULL) >> E->pshift;
        while (E->pkeys[i] != UINT64_MAX && E->pkeys[i] != key) i = (i + 1) & E->pmask;
        if (E->pkeys[i] == UINT64_MAX) { /* the first (lowest) rank of a pair wins */
            E->pkeys[i] = key;
            E->pranks[i] = (int32_t)r;
        }
    }
    Py_DECREF(fm);
    E->nmerges = nm;
    E->max_id = max_id;
    E->args = Py_BuildValue("(OOn)", obytes, omerges, cache_size);
    if (!E->args) return -1;
    /* made lazily; calloc leaves the untouched pages of a large table unallocated */
    E->ints = max_id < INTS_MAX ? calloc((size_t)max_id + 1, sizeof(PyObject *)) : NULL;
    if (cache_size < 0) cache_size = 0;
    if (cache_size > CACHE_MAX_ENTRIES) cache_size = CACHE_MAX_ENTRIES;
    E->cmax = cache_size;
    if (cache_size > 0) {
        uint64_t cc = 16;
        while (cc < (uint64_t)cache_size * 2) cc *= 2;
        E->cmask = cc - 1;
        E->slots = calloc(cc, sizeof(CacheSlot));
        if (!E->slots) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_VARARGS | METH_KEYWORDS,
     "encode(text, start=0, end=len(text), out=None) -> list[int]\n\n"
     "Token ids of text[start:end] (GPT-2 pre-tokenization, BPE by merge rank; no special tokens),\n"
     "appended to the list `out` when given (and returned), else a new list."},
    {"encode_to_bytearray", (PyCFunction)(void (*)(void))Encoder_encode_to_bytearray, METH_VARARGS | METH_KEYWORDS,
     "encode_to_bytearray(text, start, end, out, itemsize) -> int\n\n"
     "The ids of text[start:end] appended to the bytearray `out` as native unsigned ints of itemsize\n"
     "(2 or 4) bytes; returns how many were appended."},
    {"encode_stable", (PyCFunction)Encoder_encode_stable, METH_VARARGS,
     "encode_stable(text, start, end, out) -> int\n\n"
     "For streaming: append to the list `out` the ids of the pre-tokens of text[start:end] but the\n"
     "last two (final whatever text follows); returns where they end (a character index)."},
    {"encode_utf8", (PyCFunction)(void (*)(void))Encoder_encode_utf8, METH_VARARGS | METH_KEYWORDS,
     "encode_utf8(data, out, specials=()) -> int\n\n"
     "The ids of the UTF-8 bytes `data`, special tokens (a sequence of (bytes, id)) included, written\n"
     "into the writable buffer `out` of 2- or 4-byte unsigned ints (room for len(data) ids); returns\n"
     "their number. Runs without the GIL (one Encoder per thread). UnicodeDecodeError if not UTF-8."},
    {"clear_cache", (PyCFunction)Encoder_clear_cache, METH_NOARGS, "Empty the pre-token cache."},
    {"__reduce__", (PyCFunction)Encoder_reduce, METH_NOARGS, "Pickle support: rebuilt from its arguments."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Encoder_getset[] = {
    {"cache_len", (getter)Encoder_get_cache_len, NULL, "number of cached pre-tokens", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lmrun.tokenizer._encode.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(byte_ids, merges, cache_size=131072): native byte-level BPE encoder (GPT-2 pre-tokenizer).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_getset = Encoder_getset,
};

static PyObject *mod_pretokenize(PyObject *Py_UNUSED(self), PyObject *args) {
    /* pre-token boundaries of a str, for tests: list of pre-token strings */
    PyObject *text;
    if (!PyArg_ParseTuple(args, "U:pretokenize", &text)) return NULL;
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(text, &n);
    if (!u) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t j = piece_end((const uint8_t *)u, n, i);
        PyObject *p = PyUnicode_DecodeUTF8(u + i, j - i, "strict");
        if (!p || PyList_Append(out, p) < 0) {
            Py_XDECREF(p);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(p);
        i = j;
    }
    return out;
}

static PyObject *mod_scan(PyObject *Py_UNUSED(self), PyObject *args) {
    /* the pre-tokenizer alone (for profiles): number of pre-tokens of a str */
    PyObject *text;
    if (!PyArg_ParseTuple(args, "U:scan", &text)) return NULL;
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(text, &n);
    if (!u) return NULL;
    Py_ssize_t i = 0, count = 0;
    while (i < n) {
        i = piece_end((const uint8_t *)u, n, i);
        count++;
    }
    return PyLong_FromSsize_t(count);
}

static PyMethodDef module_methods[] = {
    {"scan", mod_scan, METH_VARARGS, "scan(text) -> int: number of GPT-2 pre-tokens (the pre-tokenizer alone, for profiles)."},
    {"pretokenize", mod_pretokenize, METH_VARARGS,
     "pretokenize(text) -> list[str]: GPT-2 pre-tokens of text (as PRETOKEN_RE.findall, tiktoken's classes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef encode_module = {
    PyModuleDef_HEAD_INIT, "_encode",
    "Native core of byte-level BPE encoding (see lmrun.tokenizer.tokenizer.Tokenizer).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__encode(void) {
    for (int c = 0; c < 128; c++) ascii_class[c] = uc_stage2[uc_stage1[0] * 256 + c];
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&encode_module);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    MissingByteError = PyErr_NewException("lmrun.tokenizer._encode.MissingByteError", PyExc_ValueError, NULL);
    if (!MissingByteError || PyModule_AddObject(m, "MissingByteError", MissingByteError) < 0) {
        Py_XDECREF(MissingByteError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(MissingByteError);
    return m;
}
