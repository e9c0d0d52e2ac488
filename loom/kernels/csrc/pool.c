/* loom's helper-thread pool, shared by every kernel.

   Not OpenMP: an OpenMP region ends in a barrier that waits for every team thread, so on a busy machine one
   preempted thread stalls each call for a scheduler tick (measured: 30x slower decode at load 7 on 2 vCPUs). Here
   the caller and helpers claim chunks from a shared counter; the caller waits only for chunks already being worked
   on, and a helper that wakes late finds nothing left.

   A claim is valid only against the ticket of its own job: a job ends with its ticket set to (generation, IDX_MASK),
   so a helper that read an earlier ticket of that job (and was preempted before claiming) can never claim from the
   next job's counters. (Before, a helper that read the old ticket just before the caller published the next job's
   total could claim a chunk of the next job under the old generation, run it twice and count it twice, so the caller
   returned before the last chunk was written: a decode plan's token differed from the forward's once in 300
   generates on a loaded machine. `loom_pool_selftest` reproduces that timing on demand.)

   fork: the pool's locks are taken around fork() (pthread_atfork), so a child never inherits one held by a thread
   that does not exist there; the child starts with no helpers and creates its own on its first parallel job. */
#include <pthread.h>

#include "common.h"

#ifndef LOOM_BUILD_ID
#define LOOM_BUILD_ID "unversioned"
#endif

const char *loom_build_id(void) { return LOOM_BUILD_ID; }

#define MAX_HELPERS 63
#define GEN_SHIFT 40
#define IDX_MASK ((1L << GEN_SHIFT) - 1)

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int helpers, sleepers, active;
    long ticket;                 /* (generation << GEN_SHIFT) | next unclaimed item */
    long done, total, chunk, split; /* chunk: the claims' unit; split: 2 x threads (see work) */
    task_fn fn;
    const void *args;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER; /* one job at a time; other callers run inline */

/* claim and run chunks of the job with generation `gen`; returns when none are left */
static long test_delay[2]; /* loom_pool_selftest: pauses a helper takes after reading the ticket, and the caller
                              before publishing a job's ticket (0 outside that test) */

static void pause_for(long n) {
    for (long i = 0; i < n; i++) _mm_pause();
}

static void work(long gen, int helper) {
    for (;;) {
        long t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
        long idx = t & IDX_MASK;
        if (helper && test_delay[0]) pause_for(test_delay[0]);
        if ((t >> GEN_SHIFT) != gen || idx >= __atomic_load_n(&pool.total, __ATOMIC_SEQ_CST)) return;
        /* guided: a share of what is left (in whole units of the caller's chunk), so a job takes few claims (each a
           contended atomic on another core's cache line) and still ends in single units that balance the threads */
        long unit = pool.chunk, chunk = (pool.total - idx) / (unit * pool.split) * unit;
        if (chunk < unit) chunk = unit;
        long end = idx + chunk;
        if (!__atomic_compare_exchange_n(&pool.ticket, &t, t + chunk, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            continue;
        /* the job cannot finish (nor its fields change) until this chunk is counted done */
        if (end > pool.total) end = pool.total;
        pool.fn(pool.args, idx, end);
        __atomic_add_fetch(&pool.done, end - idx, __ATOMIC_SEQ_CST);
    }
}

static int pool_spins = 0; /* loom_set_spin */

/* How long helpers look for the next job before they sleep, in pause instructions. 0 (the default) while torch's
   OpenMP workers may be spinning after their own regions: on 2 vCPUs a spinning helper and a spinning OpenMP worker
   starve each other (a whole fp32 decode measured 19.6 tok/s with 20000 spins, 22.2 with 2000, 23.8 with none).
   The decode loop, which runs torch on one thread, turns spinning on: waking a sleeping helper costs an
   inter-processor interrupt per kernel call. */
void loom_set_spin(int spins) { __atomic_store_n(&pool_spins, spins, __ATOMIC_SEQ_CST); }

static void *helper_main(void *arg) {
    int me = (int)(long)arg;
    long seen = 0;
    for (;;) {
        long gen = seen;
        for (int i = __atomic_load_n(&pool_spins, __ATOMIC_RELAXED); i > 0 && gen == seen; i--) {
            _mm_pause();
            gen = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT;
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.mu);
            __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
            while ((gen = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT) == seen)
                pthread_cond_wait(&pool.cv, &pool.mu);
            __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = gen;
        if (me < __atomic_load_n(&pool.active, __ATOMIC_SEQ_CST)) work(gen, 1);
    }
    return NULL;
}

static void before_fork(void) {
    pthread_mutex_lock(&caller);  /* waits for a running job: its helpers are not copied into the child */
    pthread_mutex_lock(&pool.mu);
}

static void after_fork_parent(void) {
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&caller);
}

static void after_fork_child(void) { /* only the forking thread exists here */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&caller, NULL);
    pool.helpers = pool.sleepers = pool.active = 0;
}

static pthread_once_t fork_handlers_once = PTHREAD_ONCE_INIT;

static void install_fork_handlers(void) { pthread_atfork(before_fork, after_fork_parent, after_fork_child); }

void parallel_run(task_fn fn, const void *args, long total, long chunk, int threads) {
    if (threads > MAX_HELPERS + 1) threads = MAX_HELPERS + 1;
    if (chunk < 1) chunk = 1; /* a claim is at least one item (work divides by it) */
    if (threads <= 1 || total <= chunk || pthread_mutex_trylock(&caller) != 0) { fn(args, 0, total); return; }
    pthread_once(&fork_handlers_once, install_fork_handlers);
    pthread_mutex_lock(&pool.mu);
    while (pool.helpers < threads - 1) {
        pthread_t th;
        if (pthread_create(&th, NULL, helper_main, (void *)(long)pool.helpers) != 0) break;
        pthread_detach(th);
        pool.helpers++;
    }
    pthread_mutex_unlock(&pool.mu);
    pool.fn = fn; pool.args = args; pool.chunk = chunk; pool.split = 2L * threads;
    __atomic_store_n(&pool.total, total, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.done, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.active, threads - 1, __ATOMIC_SEQ_CST);
    long gen = (__atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT) + 1;
    if (test_delay[1]) pause_for(test_delay[1]);
    __atomic_store_n(&pool.ticket, gen << GEN_SHIFT, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    work(gen, 0);
    while (__atomic_load_n(&pool.done, __ATOMIC_SEQ_CST) < total) _mm_pause();
    /* closed: a claim read from this job's ticket fails from now on (see the top) */
    __atomic_store_n(&pool.ticket, (gen << GEN_SHIFT) | IDX_MASK, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&caller);
}

typedef struct { int *runs; long delay; } selftest_job;

static void selftest_chunk(const void *p, long begin, long end) {
    const selftest_job *j = p;
    for (long i = begin; i < end; i++) {
        pause_for(j->delay);
        __atomic_add_fetch(&j->runs[i], 1, __ATOMIC_SEQ_CST);
    }
}

/* `jobs` parallel jobs, of `total` and `2 * total` items in turn, in chunks of `chunk` on `threads` threads, each item
   counting its runs; returns how many jobs returned with an item not run exactly once (-1 without memory).
   `item_pauses` per item, `helper_pauses` after a helper reads the ticket and `publish_pauses` before the caller
   publishes one: the timing in which a helper holds the last ticket of one job while the next one's counters are
   set (the next job larger, so that ticket's index is still below its total). */
int loom_pool_selftest(long jobs, long total, long chunk, int threads, long item_pauses, long helper_pauses,
                       long publish_pauses) {
    if (total < 0) total = 0;
    int *runs = malloc(sizeof(int) * (size_t)(2 * total + 1));
    if (!runs) return -1;
    test_delay[0] = helper_pauses;
    test_delay[1] = publish_pauses;
    int bad = 0;
    for (long n = 0; n < jobs; n++) {
        long items = n % 2 ? 2 * total : total;
        memset(runs, 0, sizeof(int) * (size_t)items);
        selftest_job job = {runs, item_pauses};
        parallel_run(selftest_chunk, &job, items, chunk, threads);
        int ok = 1;
        for (long i = 0; i < items; i++) ok &= __atomic_load_n(&runs[i], __ATOMIC_SEQ_CST) == 1;
        bad += !ok;
    }
    pause_for(100000); /* a late helper's stray claim (the bug above) would still be running: let it land first */
    test_delay[0] = test_delay[1] = 0;
    free(runs);
    return bad;
}

int loom_pool_helpers(void) { return __atomic_load_n(&pool.helpers, __ATOMIC_SEQ_CST); }
