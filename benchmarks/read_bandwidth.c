// How fast this machine reads memory in runs of RUN bytes placed STRIDE bytes apart (a KV page
// per sequence, side by side), with each run AHEAD runs on requested by software prefetch
// (0: none), on 1 and 2 threads. 256 MB, best of 5.
//
//     gcc -O2 -mavx512f -fopenmp benchmarks/read_bandwidth.c -o rb
//     ./rb 262144 262144 0      # sequential
//     ./rb 8192 262144 0        # 8 KB runs 256 KB apart
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s RUN STRIDE AHEAD (RUN a multiple of 256 dividing STRIDE)\n", argv[0]);
        return 2;
    }
    const size_t n = (size_t)256 << 20, run = strtoul(argv[1], 0, 10), stride = strtoul(argv[2], 0, 10);
    const int ahead = atoi(argv[3]);
    if (run == 0 || run % 256 || stride % run || n % stride) {
        fprintf(stderr, "RUN must be a multiple of 256 dividing STRIDE, which must divide 256 MB\n");
        return 2;
    }
    char* p = aligned_alloc(4096, n);
    for (size_t i = 0; i < n; i += 64) p[i] = 1;
    const size_t rows = n / stride, runs = n / run;
    for (int th = 1; th <= 2; ++th) {
        double best = 1e9;
        float keep = 0.f;
        for (int rep = 0; rep < 5; ++rep) {
            const double t = now();
            __m512 s = _mm512_setzero_ps();
#pragma omp parallel num_threads(th)
            {
                __m512 acc = _mm512_setzero_ps(), acc1 = acc, acc2 = acc, acc3 = acc;   // four chains
                const int me = omp_get_thread_num();
                const size_t c0 = runs * me / th, c1 = runs * (me + 1) / th;
                for (size_t c = c0; c < c1; ++c) {
                    // run c: row c % rows, column c / rows: consecutive runs lie `stride` apart
                    const size_t at = (c % rows) * stride + (c / rows) * run;
                    if (ahead && c + ahead < c1) {
                        const size_t ca = c + ahead, pa = (ca % rows) * stride + (ca / rows) * run;
                        for (size_t o = 0; o < run; o += 64) _mm_prefetch(p + pa + o, _MM_HINT_T0);
                    }
                    for (size_t o = 0; o < run; o += 256) {
                        acc = _mm512_add_ps(acc, _mm512_load_ps((const float*)(p + at + o)));
                        acc1 = _mm512_add_ps(acc1, _mm512_load_ps((const float*)(p + at + o + 64)));
                        acc2 = _mm512_add_ps(acc2, _mm512_load_ps((const float*)(p + at + o + 128)));
                        acc3 = _mm512_add_ps(acc3, _mm512_load_ps((const float*)(p + at + o + 192)));
                    }
                }
                acc = _mm512_add_ps(_mm512_add_ps(acc, acc1), _mm512_add_ps(acc2, acc3));
#pragma omp critical
                s = _mm512_add_ps(s, acc);
            }
            const double dt = now() - t;
            if (dt < best) best = dt;
            keep += _mm512_reduce_add_ps(s);
        }
        printf("runs of %zu B, %zu B apart, %d ahead, %d thread(s): %.1f GB/s%s\n", run, stride, ahead, th, n / best / 1e9,
               keep == 1.f ? " " : "");
    }
    free(p);
    return 0;
}
