// The one glibc symbol the bound of glibc_compat.h cannot pin to an older version: libstdc++'s
// headers (gcc >= 11, on glibc >= 2.32) read __libc_single_threaded to skip atomic reference
// counts in a single-threaded process. This hidden definition stands in for glibc's, so the
// library needs no GLIBC_2.32; its value 0 ("maybe multi-threaded") keeps the atomic operations
// always, which is what a library inside a JVM needs anyway.
extern "C" {
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
}
