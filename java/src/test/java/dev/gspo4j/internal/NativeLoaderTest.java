package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.Gspo4j;
import org.junit.jupiter.api.Test;

/** The load-time checks (platform, version) and Gspo4j.info(). */
class NativeLoaderTest {

    @Test
    void anotherPlatformIsRefusedByName() {
        for (String platform : new String[] {"macosx-arm64", "macosx-x86_64", "windows-x86_64", "linux-arm64"}) {
            final UnsatisfiedLinkError e = assertThrows(UnsatisfiedLinkError.class, () -> NativeLoader.checkPlatform(platform));
            assertTrue(e.getMessage().contains("supports linux-x86_64 only") && e.getMessage().contains(platform), e.getMessage());
        }
        NativeLoader.checkPlatform("linux-x86_64");
    }

    @Test
    void aNativeLibraryOfAnotherVersionIsRefused() {
        final LinkageError e = assertThrows(LinkageError.class, () -> NativeLoader.checkVersion("0.2.0", "0.1.0"));
        assertTrue(e.getMessage().contains("classes are version 0.2.0 but its native library is version 0.1.0"), e.getMessage());
        NativeLoader.checkVersion("0.1.0", "0.1.0");
    }

    @Test
    void infoDescribesTheLoadedLibrary() {
        final Gspo4j.Info info = Gspo4j.info();
        // One version source: the Maven project's, in the classes and in the native library.
        assertEquals(System.getProperty("gspo4j.version"), info.version());
        assertEquals(NativeLoader.version(), Kernels.version());
        assertTrue(info.cpuIsa().matches("avx512|avx2|sse2"), info.cpuIsa());
        assertEquals(Kernels.cudaRuntimeVersion(), info.cudaRuntimeVersion());
        assertTrue(info.cudaDevices() >= 0);
        assertEquals(Gspo4j.threads(), info.threads());
        assertTrue(info.nativeLibrary().endsWith("libjniGspo4jLibrary.so"), info.nativeLibrary());
        assertTrue(info.toString().startsWith("gspo4j " + info.version() + " linux-x86_64"), info.toString());
    }
}
