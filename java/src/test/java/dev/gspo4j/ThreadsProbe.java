package dev.gspo4j;

import org.bytedeco.pytorch.global.torch;

/** Run in a child JVM by {@link ThreadsTest}: the pool's size after the library loaded, and the inputs of its default. */
public final class ThreadsProbe {
    public static void main(String[] args) {
        System.out.println("processors=" + Runtime.getRuntime().availableProcessors());
        System.out.println("torch=" + torch.get_num_threads());
        try {
            System.out.println("threads=" + Gspo4j.threads());
        } catch (Throwable e) {
            Throwable cause = e;
            while (cause.getCause() != null) {
                cause = cause.getCause();
            }
            System.out.println("loadFailed=1");
            System.out.println("messageNamesProperty=" + (cause instanceof IllegalArgumentException && cause.getMessage().contains(
                    "the system property gspo4j.threads must be an integer in [1, 1024]") ? 1 : 0));
            System.out.println(cause);
        }
    }
}
