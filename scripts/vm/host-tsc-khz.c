/* Prints the host's TSC rate in kHz, measured against CLOCK_MONOTONIC_RAW.
 *
 * Under TCG a guest's TSC ticks at the host's rate, and the guest kernel measures that rate
 * at boot against the emulated PIT and HPET. On a loaded host that measurement can be far
 * off (CI 2026-12-07: a guest clock ran about 20 times too fast, so systemd's start timeouts
 * expired within seconds), and with tsc=reliable nothing corrects it later. scripts/vm/lib.sh
 * passes this figure as tsc_early_khz= so the guest never has to guess. */
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

static int64_t ns(const struct timespec *t) { return (int64_t)t->tv_sec * 1000000000 + t->tv_nsec; }

/* One TSC reading bracketed by two clock readings; returns the bracket's width in ns. */
static int64_t sample(uint64_t *tsc, int64_t *mid_ns) {
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC_RAW, &a);
	*tsc = __rdtsc();
	clock_gettime(CLOCK_MONOTONIC_RAW, &b);
	*mid_ns = (ns(&a) + ns(&b)) / 2;
	return ns(&b) - ns(&a);
}

/* The tightest of several samples, so a preemption between the readings does not count. */
static void best_sample(uint64_t *tsc, int64_t *mid_ns) {
	int64_t best = INT64_MAX;
	for (int i = 0; i < 200; i++) {
		uint64_t t;
		int64_t m, width = sample(&t, &m);
		if (width < best) { best = width; *tsc = t; *mid_ns = m; }
	}
}

int main(void) {
	uint64_t t0, t1;
	int64_t n0, n1;
	best_sample(&t0, &n0);
	struct timespec pause = { 0, 300 * 1000 * 1000 };
	nanosleep(&pause, NULL);
	best_sample(&t1, &n1);
	if (n1 <= n0 || t1 <= t0) return 1;
	printf("%llu\n", (unsigned long long)((t1 - t0) * 1000000ULL / (uint64_t)(n1 - n0)));
	return 0;
}
