/*
 * lmrun.tokenizer._bpe -- the merge loop of byte-level BPE training, in C.
 *
 * Source: Sennrich et al. 2016 (BPE for subwords), Radford et al. 2019 (GPT-2 byte-level
 * BPE), CS336 assignment 1 (the incremental training algorithm and the tie-break rule).
 *
 * Python interface (one function):
 *
 *   train(words, offsets, counts, max_new_tokens) -> list[tuple[int, int, int]]
 *
 *     words          bytes-like: all distinct pre-tokens (words) concatenated.
 *     offsets        bytes-like holding n+1 native int64: word i is words[offsets[i]:offsets[i+1]];
 *                    offsets[0] == 0, non-decreasing, offsets[n] <= len(words).
 *     counts         bytes-like holding n native int64 (> 0): how often word i occurs.
 *     max_new_tokens int >= 0: stop after this many NEW tokens have been created.
 *
 *   Token ids: 0..255 are the single bytes; every new token gets the next id from 256 on.
 *   Returns the merges in order as (left id, right id, result id). The result id is new
 *   (== 256 + number of earlier new tokens) unless the merged bytes equal an existing
 *   token's bytes, in which case that token's id is reused (the merge is still returned and
 *   does not count towards max_new_tokens).
 *
 *   Ordering: the pair with the highest count; ties go to the greatest
 *   (bytes(left), bytes(right)) as Python compares tuples of bytes. The loop stops when
 *   max_new_tokens tokens were created or no pair has a count > 0.
 *
 *   Raises ValueError on malformed offsets/counts, MemoryError when an allocation fails.
 *   The GIL is released during the merge loop.
 *
 * Algorithm: words as arrays of token ids (int32) with their counts (int64); a pair -> info
 * table (open addressing on a 64-bit key) holding each pair's count and the list of words it
 * occurs in; a max-heap of (count, pair) with lazy invalidation (a popped entry whose count
 * is stale is re-pushed with the current count if > 0). A merge touches only the words in
 * the merged pair's list, updates the counts of the pairs that change around each merged
 * occurrence, and pushes the pairs containing the new token (the only counts that grow).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t count;
    int32_t left, right;
    int32_t *words;    /* words this pair occurred in (may hold stale entries and repeats) */
    int32_t nwords, capwords;
    int32_t last_word; /* last word appended to `words`: dedupes appends within one word */
    int32_t last_step; /* last merge step at which this pair was put on the touched list */
} Pair;

typedef struct {
    int64_t count;
    int32_t pair;
} HeapEntry;

typedef struct {
    /* token bytes: token t is tokbuf[tok_off[t] : tok_off[t] + tok_len[t]] */
    uint8_t *tokbuf;
    size_t tokbuf_len, tokbuf_cap;
    size_t *tok_off;
    int32_t *tok_len;
    int32_t ntok, captok;
    /* bytes -> token id for multi-byte tokens (open addressing, -1 = empty) */
    int32_t *tmap;
    size_t tmap_cap;
    /* pairs and the (left, right) -> pair index map (open addressing, -1 = empty) */
    Pair *pairs;
    int32_t npairs, cappairs;
    uint64_t *pkeys;
    int32_t *pvals;
    size_t pmap_cap;
    int pmap_shift;
    /* max-heap */
    HeapEntry *heap;
    size_t nheap, capheap;
    /* words (only those with >= 2 bytes) */
    int32_t *wtok;
    int64_t *woff;
    int32_t *wlen;
    int64_t *wcnt;
    int32_t nwords;
    int32_t maxwlen;
    uint8_t *flag_old, *flag_new;
    /* pairs whose count grew during the current step */
    int32_t *touched;
    size_t ntouched, captouched;
    /* output: triples (left, right, result) */
    int32_t *out;
    size_t nout, capout;
} State;

/* ---------------------------------------------------------------- small helpers */

static int grow(void **ptr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t ncap = *cap ? *cap : 16;
    while (ncap < need) ncap *= 2;
    void *p = realloc(*ptr, ncap * elem);
    if (!p) return -1;
    *ptr = p;
    *cap = ncap;
    return 0;
}

static inline uint64_t pair_key(int32_t l, int32_t r) {
    return ((uint64_t)(uint32_t)l << 32) | (uint32_t)r;
}

static inline size_t pair_slot(const State *S, uint64_t key) {
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> S->pmap_shift);
}

static inline uint64_t bytes_hash(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

/* Compare two tokens' bytes as Python compares bytes objects. */
static inline int tok_cmp(const State *S, int32_t a, int32_t b) {
    if (a == b) return 0;
    int32_t la = S->tok_len[a], lb = S->tok_len[b];
    int c = memcmp(S->tokbuf + S->tok_off[a], S->tokbuf + S->tok_off[b], (size_t)(la < lb ? la : lb));
    if (c) return c;
    return (la > lb) - (la < lb);
}

/* > 0 when heap entry x ranks above y: higher count, then greater (left bytes, right bytes). */
static inline int entry_above(const State *S, const HeapEntry *x, const HeapEntry *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->pair == y->pair) return 0;
    const Pair *p = &S->pairs[x->pair], *q = &S->pairs[y->pair];
    int c = tok_cmp(S, p->left, q->left);
    if (c) return c > 0;
    return tok_cmp(S, p->right, q->right) > 0;
}

/* ---------------------------------------------------------------- heap */

static void sift_down(State *S, size_t i) {
    HeapEntry *h = S->heap;
    size_t n = S->nheap;
    HeapEntry e = h[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && entry_above(S, &h[c + 1], &h[c])) c++;
        if (!entry_above(S, &h[c], &e)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = e;
}

static int heap_push(State *S, int64_t count, int32_t pair) {
    if (grow((void **)&S->heap, &S->capheap, S->nheap + 1, sizeof(HeapEntry))) return -1;
    HeapEntry e = {count, pair};
    size_t i = S->nheap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!entry_above(S, &e, &S->heap[parent])) break;
        S->heap[i] = S->heap[parent];
        i = parent;
    }
    S->heap[i] = e;
    return 0;
}

static HeapEntry heap_pop(State *S) {
    HeapEntry top = S->heap[0];
    S->nheap--;
    if (S->nheap > 0) {
        S->heap[0] = S->heap[S->nheap];
        sift_down(S, 0);
    }
    return top;
}

/* ---------------------------------------------------------------- pair table */

static int pmap_resize(State *S, size_t ncap) {
    uint64_t *keys = malloc(ncap * sizeof(uint64_t));
    int32_t *vals = malloc(ncap * sizeof(int32_t));
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return -1;
    }
    memset(vals, 0xff, ncap * sizeof(int32_t));
    int shift = 64;
    for (size_t c = ncap; c > 1; c >>= 1) shift--;
    size_t mask = ncap - 1;
    for (size_t i = 0; i < S->pmap_cap; i++) {
        if (S->pvals[i] < 0) continue;
        uint64_t key = S->pkeys[i];
        size_t s = (size_t)((key * 0x9E3779B97F4A7C15ULL) >> shift);
        while (vals[s] >= 0) s = (s + 1) & mask;
        keys[s] = key;
        vals[s] = S->pvals[i];
    }
    free(S->pkeys);
    free(S->pvals);
    S->pkeys = keys;
    S->pvals = vals;
    S->pmap_cap = ncap;
    S->pmap_shift = shift;
    return 0;
}

/* Index of pair (l, r), or -1 if absent. */
static inline int32_t pair_find(const State *S, int32_t l, int32_t r) {
    uint64_t key = pair_key(l, r);
    size_t mask = S->pmap_cap - 1, s = pair_slot(S, key);
    for (;;) {
        int32_t v = S->pvals[s];
        if (v < 0) return -1;
        if (S->pkeys[s] == key) return v;
        s = (s + 1) & mask;
    }
}

/* Index of pair (l, r), created with count 0 if absent; -1 on allocation failure. */
static int32_t pair_get(State *S, int32_t l, int32_t r) {
    uint64_t key = pair_key(l, r);
    size_t mask = S->pmap_cap - 1, s = pair_slot(S, key);
    for (;;) {
        int32_t v = S->pvals[s];
        if (v < 0) break;
        if (S->pkeys[s] == key) return v;
        s = (s + 1) & mask;
    }
    if (S->npairs == INT32_MAX) return -1;
    size_t cap = (size_t)S->cappairs;
    if (grow((void **)&S->pairs, &cap, (size_t)S->npairs + 1, sizeof(Pair))) return -1;
    S->cappairs = (int32_t)(cap > INT32_MAX ? INT32_MAX : cap);
    int32_t idx = S->npairs++;
    Pair *p = &S->pairs[idx];
    p->count = 0;
    p->left = l;
    p->right = r;
    p->words = NULL;
    p->nwords = p->capwords = 0;
    p->last_word = -1;
    p->last_step = -1;
    S->pkeys[s] = key;
    S->pvals[s] = idx;
    if ((size_t)S->npairs * 2 > S->pmap_cap) {
        if (pmap_resize(S, S->pmap_cap * 2)) return -1;
    }
    return idx;
}

static int pair_add_word(State *S, int32_t pi, int32_t w) {
    Pair *p = &S->pairs[pi];
    if (p->last_word == w) return 0;
    if (p->nwords == p->capwords) {
        int32_t ncap = p->capwords ? p->capwords * 2 : 4;
        if (p->capwords > INT32_MAX / 2) return -1;
        int32_t *nw = realloc(p->words, (size_t)ncap * sizeof(int32_t));
        if (!nw) return -1;
        p->words = nw;
        p->capwords = ncap;
    }
    p->words[p->nwords++] = w;
    p->last_word = w;
    return 0;
}

/* ---------------------------------------------------------------- tokens */

static int tmap_insert_raw(int32_t *map, size_t cap, const State *S, int32_t t) {
    size_t mask = cap - 1;
    size_t s = (size_t)bytes_hash(S->tokbuf + S->tok_off[t], (size_t)S->tok_len[t]) & mask;
    while (map[s] >= 0) s = (s + 1) & mask;
    map[s] = t;
    return 0;
}

/* Id of the multi-byte token with these bytes, or -1. */
static int32_t tmap_find(const State *S, const uint8_t *p, size_t n) {
    size_t mask = S->tmap_cap - 1;
    size_t s = (size_t)bytes_hash(p, n) & mask;
    for (;;) {
        int32_t t = S->tmap[s];
        if (t < 0) return -1;
        if ((size_t)S->tok_len[t] == n && memcmp(S->tokbuf + S->tok_off[t], p, n) == 0) return t;
        s = (s + 1) & mask;
    }
}

/* Append the bytes of a+b as a candidate token; return its id (existing or new), -1 on
 * allocation failure. *is_new tells which. */
static int32_t token_merge(State *S, int32_t a, int32_t b, int *is_new) {
    size_t la = (size_t)S->tok_len[a], lb = (size_t)S->tok_len[b], n = la + lb;
    if (n > INT32_MAX) return -1;
    if (grow((void **)&S->tokbuf, &S->tokbuf_cap, S->tokbuf_len + n, 1)) return -1;
    uint8_t *dst = S->tokbuf + S->tokbuf_len;
    memcpy(dst, S->tokbuf + S->tok_off[a], la);
    memcpy(dst + la, S->tokbuf + S->tok_off[b], lb);
    int32_t found = tmap_find(S, dst, n);
    if (found >= 0) {
        *is_new = 0;
        return found;
    }
    if (S->ntok == INT32_MAX) return -1;
    if (S->ntok == S->captok) {
        int32_t ncap = S->captok * 2;
        size_t *no = realloc(S->tok_off, (size_t)ncap * sizeof(size_t));
        if (!no) return -1;
        S->tok_off = no;
        int32_t *nl = realloc(S->tok_len, (size_t)ncap * sizeof(int32_t));
        if (!nl) return -1;
        S->tok_len = nl;
        S->captok = ncap;
    }
    int32_t t = S->ntok++;
    S->tok_off[t] = S->tokbuf_len;
    S->tok_len[t] = (int32_t)n;
    S->tokbuf_len += n;
    if ((size_t)(S->ntok - 256) * 2 > S->tmap_cap) {
        size_t ncap = S->tmap_cap * 2;
        int32_t *nm = malloc(ncap * sizeof(int32_t));
        if (!nm) return -1;
        memset(nm, 0xff, ncap * sizeof(int32_t));
        for (int32_t u = 256; u < S->ntok; u++) tmap_insert_raw(nm, ncap, S, u);
        free(S->tmap);
        S->tmap = nm;
        S->tmap_cap = ncap;
    } else {
        tmap_insert_raw(S->tmap, S->tmap_cap, S, t);
    }
    *is_new = 1;
    return t;
}

/* ---------------------------------------------------------------- merge step */

/* Merge every non-overlapping (left-to-right) occurrence of (a, b) in word w into n.
 * Returns -1 on allocation failure, 0 otherwise. */
static int merge_word(State *S, int32_t w, int32_t a, int32_t b, int32_t n, int32_t step) {
    int32_t *t = S->wtok + S->woff[w];
    int32_t L = S->wlen[w];
    int64_t c = S->wcnt[w];
    uint8_t *fo = S->flag_old, *fn = S->flag_new;
    int any = 0;
    int32_t i = 0;
    while (i < L) {
        if (i + 1 < L && t[i] == a && t[i + 1] == b) {
            fo[i] = 1; /* start of an occurrence */
            fo[i + 1] = 2;
            i += 2;
            any = 1;
        } else {
            fo[i] = 0;
            i++;
        }
    }
    if (!any) return 0;
    /* the pairs that overlap an occurrence disappear */
    for (i = 0; i + 1 < L; i++) {
        if (fo[i] | fo[i + 1]) {
            int32_t pi = pair_find(S, t[i], t[i + 1]);
            if (pi >= 0) S->pairs[pi].count -= c;
        }
    }
    /* merge in place */
    int32_t j = 0;
    i = 0;
    while (i < L) {
        if (fo[i] == 1) {
            t[j] = n;
            fn[j] = 1;
            i += 2;
        } else {
            t[j] = t[i];
            fn[j] = 0;
            i++;
        }
        j++;
    }
    S->wlen[w] = j;
    /* the pairs next to a new token appear */
    for (i = 0; i + 1 < j; i++) {
        if (fn[i] | fn[i + 1]) {
            int32_t pi = pair_get(S, t[i], t[i + 1]);
            if (pi < 0) return -1;
            Pair *p = &S->pairs[pi];
            p->count += c;
            if (pair_add_word(S, pi, w)) return -1;
            if (p->last_step != step) {
                p->last_step = step;
                if (grow((void **)&S->touched, &S->captouched, S->ntouched + 1, sizeof(int32_t))) return -1;
                S->touched[S->ntouched++] = pi;
            }
        }
    }
    return 0;
}

/* The merge loop. Returns 0, or -1 on allocation failure. Runs without the GIL. */
static int run_merges(State *S, int64_t max_new) {
    int64_t created = 0;
    int32_t step = 0;
    while (created < max_new && S->nheap > 0) {
        HeapEntry top = heap_pop(S);
        Pair *P = &S->pairs[top.pair];
        if (top.count != P->count) {
            if (P->count > 0 && heap_push(S, P->count, top.pair)) return -1;
            continue;
        }
        if (P->count <= 0) continue;
        int32_t a = P->left, b = P->right;
        int is_new = 0;
        int32_t n = token_merge(S, a, b, &is_new);
        if (n < 0) return -1;
        created += is_new;
        if (grow((void **)&S->out, &S->capout, S->nout + 3, sizeof(int32_t))) return -1;
        S->out[S->nout++] = a;
        S->out[S->nout++] = b;
        S->out[S->nout++] = n;
        step++;
        /* Take the word list: no pair added in this step can be (a, b), since every added
         * pair contains n, whose bytes are longer than those of a and of b. */
        int32_t *wl = P->words;
        int32_t nw = P->nwords;
        P->words = NULL;
        P->nwords = P->capwords = 0;
        P->last_word = -1;
        S->ntouched = 0;
        int rc = 0;
        for (int32_t k = 0; k < nw && rc == 0; k++) rc = merge_word(S, wl[k], a, b, n, step);
        free(wl);
        if (rc) return -1;
        for (size_t k = 0; k < S->ntouched; k++) {
            int32_t pi = S->touched[k];
            if (S->pairs[pi].count > 0 && heap_push(S, S->pairs[pi].count, pi)) return -1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- setup / teardown */

static void state_free(State *S) {
    free(S->tokbuf);
    free(S->tok_off);
    free(S->tok_len);
    free(S->tmap);
    if (S->pairs) {
        for (int32_t i = 0; i < S->npairs; i++) free(S->pairs[i].words);
    }
    free(S->pairs);
    free(S->pkeys);
    free(S->pvals);
    free(S->heap);
    free(S->wtok);
    free(S->woff);
    free(S->wlen);
    free(S->wcnt);
    free(S->flag_old);
    free(S->flag_new);
    free(S->touched);
    free(S->out);
    memset(S, 0, sizeof(*S));
}

/* Build tokens, words, pair table and heap. Returns 0, -1 on allocation failure. */
static int state_init(State *S, const uint8_t *data, const int64_t *offs, const int64_t *cnts, Py_ssize_t n) {
    /* tokens 0..255 */
    S->captok = 512;
    S->tok_off = malloc((size_t)S->captok * sizeof(size_t));
    S->tok_len = malloc((size_t)S->captok * sizeof(int32_t));
    S->tokbuf_cap = 4096;
    S->tokbuf = malloc(S->tokbuf_cap);
    S->tmap_cap = 1024;
    S->tmap = malloc(S->tmap_cap * sizeof(int32_t));
    if (!S->tok_off || !S->tok_len || !S->tokbuf || !S->tmap) return -1;
    memset(S->tmap, 0xff, S->tmap_cap * sizeof(int32_t));
    for (int32_t t = 0; t < 256; t++) {
        S->tokbuf[t] = (uint8_t)t;
        S->tok_off[t] = (size_t)t;
        S->tok_len[t] = 1;
    }
    S->tokbuf_len = 256;
    S->ntok = 256;

    /* words with >= 2 bytes */
    size_t total = 0;
    int32_t nw = 0, maxlen = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t len = offs[i + 1] - offs[i];
        if (len >= 2) {
            total += (size_t)len;
            nw++;
            if (len > maxlen) maxlen = (int32_t)len;
        }
    }
    S->nwords = nw;
    S->maxwlen = maxlen;
    S->wtok = malloc((total ? total : 1) * sizeof(int32_t));
    S->woff = malloc((size_t)(nw ? nw : 1) * sizeof(int64_t));
    S->wlen = malloc((size_t)(nw ? nw : 1) * sizeof(int32_t));
    S->wcnt = malloc((size_t)(nw ? nw : 1) * sizeof(int64_t));
    S->flag_old = malloc((size_t)maxlen + 1);
    S->flag_new = malloc((size_t)maxlen + 1);
    if (!S->wtok || !S->woff || !S->wlen || !S->wcnt || !S->flag_old || !S->flag_new) return -1;

    /* pair table sized for roughly one pair per 4 word bytes */
    size_t pcap = 1024;
    while (pcap < total / 2 && pcap < ((size_t)1 << 30)) pcap *= 2;
    S->pmap_cap = 0;
    S->pvals = NULL;
    S->pkeys = NULL;
    if (pmap_resize(S, pcap)) return -1;

    size_t pos = 0;
    int32_t w = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t len = offs[i + 1] - offs[i];
        if (len < 2) continue;
        const uint8_t *src = data + offs[i];
        int32_t *dst = S->wtok + pos;
        for (int64_t k = 0; k < len; k++) dst[k] = src[k];
        S->woff[w] = (int64_t)pos;
        S->wlen[w] = (int32_t)len;
        S->wcnt[w] = cnts[i];
        for (int64_t k = 0; k + 1 < len; k++) {
            int32_t pi = pair_get(S, dst[k], dst[k + 1]);
            if (pi < 0) return -1;
            S->pairs[pi].count += cnts[i];
            if (pair_add_word(S, pi, w)) return -1;
        }
        pos += (size_t)len;
        w++;
    }

    /* heap of every pair, heapified */
    if (grow((void **)&S->heap, &S->capheap, (size_t)S->npairs + 1, sizeof(HeapEntry))) return -1;
    for (int32_t i = 0; i < S->npairs; i++) {
        S->heap[i].count = S->pairs[i].count;
        S->heap[i].pair = i;
    }
    S->nheap = (size_t)S->npairs;
    for (size_t i = S->nheap / 2; i-- > 0;) sift_down(S, i);
    return 0;
}

/* ---------------------------------------------------------------- Python binding */

static PyObject *bpe_train(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer words, offsets, counts;
    long long max_new;
    if (!PyArg_ParseTuple(args, "y*y*y*L:train", &words, &offsets, &counts, &max_new)) return NULL;
    PyObject *result = NULL;
    State S;
    memset(&S, 0, sizeof(S));

    if (offsets.len % 8 != 0 || offsets.len < 8 || counts.len % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "offsets and counts must hold int64 values; offsets needs n+1 >= 1 entries");
        goto done;
    }
    Py_ssize_t n = counts.len / 8;
    if (offsets.len / 8 != n + 1) {
        PyErr_Format(PyExc_ValueError, "offsets has %zd entries; expected len(counts) + 1 = %zd", offsets.len / 8, n + 1);
        goto done;
    }
    if (max_new < 0) {
        PyErr_SetString(PyExc_ValueError, "max_new_tokens must be >= 0");
        goto done;
    }
    /* copy to aligned arrays (buffers from bytes objects need not be 8-byte aligned) */
    int64_t *offs = malloc((size_t)(n + 1) * sizeof(int64_t));
    int64_t *cnts = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    if (!offs || !cnts) {
        free(offs);
        free(cnts);
        PyErr_NoMemory();
        goto done;
    }
    memcpy(offs, offsets.buf, (size_t)(n + 1) * sizeof(int64_t));
    memcpy(cnts, counts.buf, (size_t)n * sizeof(int64_t));
    int bad = offs[0] != 0 || offs[n] > (int64_t)words.len;
    for (Py_ssize_t i = 0; i < n && !bad; i++) {
        if (offs[i + 1] < offs[i] || offs[i + 1] - offs[i] > INT32_MAX) bad = 1;
        if (cnts[i] <= 0) bad = 2;
    }
    if (bad) {
        free(offs);
        free(cnts);
        PyErr_SetString(PyExc_ValueError,
                        bad == 2 ? "every word count must be > 0"
                                 : "offsets must start at 0, not decrease, and end within the words buffer");
        goto done;
    }

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = state_init(&S, (const uint8_t *)words.buf, offs, cnts, n);
    if (rc == 0) rc = run_merges(&S, (int64_t)max_new);
    Py_END_ALLOW_THREADS
    free(offs);
    free(cnts);
    if (rc) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New((Py_ssize_t)(S.nout / 3));
    if (!result) goto done;
    for (size_t k = 0; k < S.nout / 3; k++) {
        PyObject *t = Py_BuildValue("(iii)", S.out[3 * k], S.out[3 * k + 1], S.out[3 * k + 2]);
        if (!t) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)k, t);
    }

done:
    state_free(&S);
    PyBuffer_Release(&words);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&counts);
    return result;
}

static PyMethodDef bpe_methods[] = {
    {"train", bpe_train, METH_VARARGS,
     "train(words, offsets, counts, max_new_tokens) -> list[(left, right, result)]\n\n"
     "BPE merge loop over distinct words. words: bytes of all words concatenated; offsets: n+1\n"
     "native int64 (word i = words[offsets[i]:offsets[i+1]]); counts: n native int64 > 0.\n"
     "Ids 0..255 are bytes, new tokens get 256, 257, ... A merge whose bytes equal an existing\n"
     "token reuses its id. Highest count first, ties to the greatest (bytes(left), bytes(right)).\n"
     "Stops after max_new_tokens new tokens or when no pair is left. Raises ValueError, MemoryError."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef bpe_module = {
    PyModuleDef_HEAD_INIT, "_bpe",
    "C merge loop of byte-level BPE training (see lmrun.tokenizer.bpe).", -1, bpe_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bpe(void) { return PyModule_Create(&bpe_module); }
