// Force-included (-include) into every C++ translation unit of libgspo4j.so and of its JNI glue, so
// that the libraries run on glibc 2.28 (RHEL 8, Debian 10, Ubuntu 20.04 and newer) although they are
// built on a newer one (CI: Debian 12, glibc 2.36).
//
// A program linked against glibc >= 2.34 binds the pthread and dl functions to their GLIBC_2.34
// versions (the release that moved libpthread and libdl into libc), and exp/log/pow/log2 to their
// GLIBC_2.29 versions (the new implementations). The directives below bind each to the version
// every x86-64 glibc has (GLIBC_2.2.5); glibc keeps those versions as aliases of the same code
// (exp and log: the same implementation behind a wrapper that also sets errno), so nothing changes
// on a new glibc. `cmake/check_natives.sh` fails the build when a version above the bound shows up.
#pragma once

#if defined(__linux__)
#include <features.h>  // defines __GLIBC__
#endif
#if defined(__linux__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(GSPO4J_NO_GLIBC_COMPAT)
#define GSPO4J_GLIBC_OLD(name) __asm__(".symver " #name "," #name "@GLIBC_2.2.5");
GSPO4J_GLIBC_OLD(pthread_create)
GSPO4J_GLIBC_OLD(pthread_join)
GSPO4J_GLIBC_OLD(pthread_detach)
GSPO4J_GLIBC_OLD(pthread_once)
GSPO4J_GLIBC_OLD(pthread_key_create)
GSPO4J_GLIBC_OLD(__pthread_key_create)
GSPO4J_GLIBC_OLD(pthread_key_delete)
GSPO4J_GLIBC_OLD(pthread_getspecific)
GSPO4J_GLIBC_OLD(pthread_setspecific)
GSPO4J_GLIBC_OLD(pthread_attr_setstacksize)
GSPO4J_GLIBC_OLD(pthread_mutexattr_init)
GSPO4J_GLIBC_OLD(pthread_mutexattr_settype)
GSPO4J_GLIBC_OLD(pthread_mutexattr_destroy)
GSPO4J_GLIBC_OLD(dlopen)
GSPO4J_GLIBC_OLD(dlsym)
GSPO4J_GLIBC_OLD(dlclose)
GSPO4J_GLIBC_OLD(dlerror)
GSPO4J_GLIBC_OLD(dladdr)
GSPO4J_GLIBC_OLD(exp)
GSPO4J_GLIBC_OLD(log)
GSPO4J_GLIBC_OLD(pow)
GSPO4J_GLIBC_OLD(log2)
#undef GSPO4J_GLIBC_OLD
#endif
