package dev.gspo4j.internal;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.util.Properties;
import org.bytedeco.javacpp.Loader;

/**
 * Loads gspo4j's native library once, with the three checks a user needs to hear about in their
 * own terms: the platform (linux-x86_64 only), the natives jar on the class path (the classifier
 * jar, or gspo4j-platform), and the natives' version against the classes' (one source: the
 * Maven project's version, in {@code dev/gspo4j/gspo4j.properties} and in {@code
 * gspo4j_version()}).
 */
public final class NativeLoader {
    /** The platforms gspo4j ships natives for (JavaCPP's names). */
    public static final String SUPPORTED_PLATFORMS = "linux-x86_64";

    private static final String VERSION = readVersion();
    private static volatile String loadedPath;
    // Loader.load initialises Gspo4jLibrary, whose static block calls load() again (same thread).
    private static boolean loading;

    private NativeLoader() {}

    /** The classes' version, e.g. {@code 0.1.0} (the Maven project's version). */
    public static String version() {
        return VERSION;
    }

    /** The file of the JNI library that was loaded ({@code .../linux-x86_64-gpu/...} for the CUDA natives). */
    public static String loadedPath() {
        Gspo4jLibrary.ensureLoaded();
        return loadedPath;
    }

    /**
     * Loads the library unless it is loaded; called by {@link Gspo4jLibrary}'s static initialiser
     * (the one entry: a class that needs the library initialises that class first). Throws {@link UnsatisfiedLinkError} on a platform
     * gspo4j does not support or when the natives jar is missing, and {@link LinkageError} when
     * the natives' version differs from the classes'.
     */
    static synchronized void load() {
        if (loadedPath != null || loading || !Loader.isLoadLibraries()) {
            return;
        }
        checkPlatform(Loader.getPlatform());
        final String path;
        loading = true;
        try {
            path = Loader.load(Gspo4jLibrary.class);
        } catch (UnsatisfiedLinkError e) {
            final UnsatisfiedLinkError error = new UnsatisfiedLinkError("gspo4j's native library did not load: put "
                    + "dev.gspo4j:gspo4j-platform:" + VERSION + " on the class path, or dev.gspo4j:gspo4j:" + VERSION
                    + ":linux-x86_64 (linux-x86_64-gpu for CUDA) beside dev.gspo4j:gspo4j, and the presets' natives of "
                    + "org.bytedeco:pytorch (README, \"Dependencies\"). Cause: " + e.getMessage());
            error.initCause(e);
            throw error;
        } finally {
            loading = false;
        }
        checkVersion(VERSION, Gspo4jLibrary.gspo4j_version().getString());
        loadedPath = path == null ? "" : path;
    }

    /** The platform check, on JavaCPP's name of this JVM's platform. */
    static void checkPlatform(String platform) {
        if (!SUPPORTED_PLATFORMS.equals(platform)) {
            throw new UnsatisfiedLinkError("gspo4j supports " + SUPPORTED_PLATFORMS + " only (Linux on x86-64, glibc 2.28+)"
                    + ", and this JVM runs on " + platform + ": there is no gspo4j native library for it");
        }
    }

    /** The version check: the native library must be the classes' own version. */
    static void checkVersion(String classes, String natives) {
        if (!classes.equals(natives)) {
            throw new LinkageError("gspo4j's classes are version " + classes + " but its native library is version " + natives
                    + ": use one version for dev.gspo4j:gspo4j and its natives jar (linux-x86_64 or linux-x86_64-gpu)");
        }
    }

    private static String readVersion() {
        try (InputStream in = NativeLoader.class.getResourceAsStream("/dev/gspo4j/gspo4j.properties")) {
            if (in == null) {
                throw new IllegalStateException("dev/gspo4j/gspo4j.properties is missing from gspo4j's jar");
            }
            final Properties properties = new Properties();
            properties.load(in);
            return properties.getProperty("version");
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }
}
