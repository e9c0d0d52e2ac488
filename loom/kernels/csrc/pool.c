/* loom's helper-thread pool, shared by every kernel.

   Not OpenMP: an OpenMP region ends in a barrier that waits for every team thread, so on a busy machine one
   preempted thread stalls each call for a scheduler tick (measured: 30x slower decode at load 7 on 2 vCPUs). Here
   the caller and helpers claim chunks from a shared counter; the caller waits only for chunks already being worked
   on, and a helper that wakes late finds nothing left.

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
    long done, total, chunk;
    task_fn fn;
    const void *args;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER; /* one job at a time; other callers run inline */

/* claim and run chunks of the job with generation `gen`; returns when none are left */
static void work(long gen) {
    for (;;) {
        long t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
        long idx = t & IDX_MASK;
        if ((t >> GEN_SHIFT) != gen || idx >= __atomic_load_n(&pool.total, __ATOMIC_SEQ_CST)) return;
        long chunk = pool.chunk, end = idx + chunk;
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
        if (me < __atomic_load_n(&pool.active, __ATOMIC_SEQ_CST)) work(gen);
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
    pool.fn = fn; pool.args = args; pool.chunk = chunk;
    __atomic_store_n(&pool.total, total, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.done, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.active, threads - 1, __ATOMIC_SEQ_CST);
    long gen = (__atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT) + 1;
    __atomic_store_n(&pool.ticket, gen << GEN_SHIFT, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    work(gen);
    while (__atomic_load_n(&pool.done, __ATOMIC_SEQ_CST) < total) _mm_pause();
    pthread_mutex_unlock(&caller);
}

int loom_pool_helpers(void) { return __atomic_load_n(&pool.helpers, __ATOMIC_SEQ_CST); }
