package dev.gspo4j.internal;

import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.Loader;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.annotation.Cast;
import org.bytedeco.javacpp.annotation.Const;
import org.bytedeco.javacpp.annotation.Name;
import org.bytedeco.javacpp.annotation.Platform;
import org.bytedeco.javacpp.annotation.Properties;

/**
 * The JavaCPP mapping of {@code native/include/gspo4j/gspo4j.h}, one method per C function and
 * nothing else. Callers go through {@link Kernels}, which checks arguments first and turns a
 * status into an exception.
 *
 * <p>Two flavours of the same natives: {@code linux-x86_64} (CPU kernels) and, found first when its
 * jar is on the class path, {@code linux-x86_64-gpu} (CPU and CUDA kernels), as the presets name
 * theirs. {@link NativeLoader} loads them and checks the platform and the version.
 */
@Properties({
    @Platform(include = "gspo4j/gspo4j.h", link = "gspo4j"),
    @Platform(include = "gspo4j/gspo4j.h", link = "gspo4j", extension = "-gpu")})
final class Gspo4jLibrary {
    static {
        NativeLoader.load();
        // The pool's default (Kernels.defaultThreads), before any kernel can start its workers.
        // (Not while JavaCPP's builder reads this class: it loads no library.)
        if (Loader.isLoadLibraries()) {
            final int status = gspo4j_set_num_threads(Kernels.defaultThreads());
            if (status != 0) {
                throw new IllegalStateException("gspo4j_set_num_threads failed: " + gspo4j_last_error().getString());
            }
        }
    }

    private Gspo4jLibrary() {}

    /** Initialises this class, which loads and checks the native library (NativeLoader). */
    static void ensureLoaded() {}

    /** {@code gspo4j_loss_config}. */
    @Name("gspo4j_loss_config")
    static final class LossConfig extends Pointer {
        static {
            ensureLoaded();
            Loader.load();
        }

        LossConfig() {
            allocate();
        }

        private native void allocate();

        native int ratio_level();
        native LossConfig ratio_level(int value);
        native int aggregation();
        native LossConfig aggregation(int value);
        native int kl_estimator();
        native LossConfig kl_estimator(int value);
        native int check_finite();
        native LossConfig check_finite(int value);
        native double eps_low();
        native LossConfig eps_low(double value);
        native double eps_high();
        native LossConfig eps_high(double value);
        native double dual_clip();
        native LossConfig dual_clip(double value);
        native double log_ratio_clamp();
        native LossConfig log_ratio_clamp(double value);
        native double normalizer();
        native LossConfig normalizer(double value);
        native double length_norm();
        native LossConfig length_norm(double value);
        native double kl_coef();
        native LossConfig kl_coef(double value);
        native double entropy_coef();
        native LossConfig entropy_coef(double value);
        native int objective();
        native LossConfig objective(int value);
        native double sapo_tau_pos();
        native LossConfig sapo_tau_pos(double value);
        native double sapo_tau_neg();
        native LossConfig sapo_tau_neg(double value);
        native double vespo_k_pos();
        native LossConfig vespo_k_pos(double value);
        native double vespo_lambda_pos();
        native LossConfig vespo_lambda_pos(double value);
        native double vespo_k_neg();
        native LossConfig vespo_k_neg(double value);
        native double vespo_lambda_neg();
        native LossConfig vespo_lambda_neg(double value);
        native double dppo_delta_low();
        native LossConfig dppo_delta_low(double value);
        native double dppo_delta_high();
        native LossConfig dppo_delta_high(double value);
        native double dppo_ratio_cap();
        native LossConfig dppo_ratio_cap(double value);
        native double responses_total();
        native LossConfig responses_total(double value);
        native double tokens_total();
        native LossConfig tokens_total(double value);
        native double batch_total();
        native LossConfig batch_total(double value);
        native int rollout_level();
        native LossConfig rollout_level(int value);
        native int rollout_mode();
        native LossConfig rollout_mode(int value);
        native double rollout_c_min();
        native LossConfig rollout_c_min(double value);
        native double rollout_c_max();
        native LossConfig rollout_c_max(double value);
        native int rejection_divergence();
        native LossConfig rejection_divergence(int value);
        native int rejection_scope();
        native LossConfig rejection_scope(int value);
        native double rejection_low();
        native LossConfig rejection_low(double value);
        native double rejection_high();
        native LossConfig rejection_high(double value);
        native int off_policy_mask();
        native LossConfig off_policy_mask(int value);
        native double off_policy_delta();
        native LossConfig off_policy_delta(double value);
    }

    static native @Cast("const char*") BytePointer gspo4j_last_error();

    static native @Cast("const char*") BytePointer gspo4j_version();

    static native int gspo4j_cuda_device_count();

    static native int gspo4j_cuda_runtime_version();

    static native int gspo4j_set_num_threads(int threads);

    static native int gspo4j_get_num_threads();

    static native @Cast("const char*") BytePointer gspo4j_cpu_isa();

    static native int gspo4j_cuda_check_error(Pointer stream);

    static native int gspo4j_cuda_defer_error_check(Pointer stream, @Cast("int64_t*") LongPointer ticket);

    static native int gspo4j_cuda_resolve_error_check(@Cast("int64_t") long ticket);

    static native int gspo4j_loss_config_init(LossConfig config);

    static native int gspo4j_token_logprob_forward(
            int device, Pointer stream,
            @Const Pointer logits, int dtype, long batch, long seq, long vocab,
            long strideBatch, long strideSeq,
            @Cast("const int64_t*") LongPointer targets, double temperature, int checkFinite,
            FloatPointer logprob, DoublePointer lse, FloatPointer entropy);

    static native int gspo4j_token_logprob_backward(
            int device, Pointer stream,
            @Const Pointer logits, int dtype, long batch, long seq, long vocab,
            long strideBatch, long strideSeq,
            @Cast("const int64_t*") LongPointer targets, double temperature,
            @Const DoublePointer lse, @Const FloatPointer entropy,
            @Const FloatPointer gradLogprob, @Const FloatPointer gradEntropy,
            Pointer gradLogits, long gradStrideBatch, long gradStrideSeq);

    static native int gspo4j_sequence_log_ratio(
            int device, Pointer stream,
            long batch, long seq, long tokens, @Cast("const int64_t*") LongPointer offsets,
            @Const FloatPointer logprob, @Const FloatPointer oldLogprob, @Cast("const uint8_t*") BytePointer mask,
            int checkFinite, FloatPointer logRatio, FloatPointer lengths);

    static native int gspo4j_policy_loss(
            int device, Pointer stream, @Const LossConfig config,
            long batch, long seq, long tokens, @Cast("const int64_t*") LongPointer offsets,
            @Const FloatPointer logprob, @Const FloatPointer oldLogprob, @Const FloatPointer rolloutLogprob,
            @Cast("const uint8_t*") BytePointer mask, @Const FloatPointer advantages, int advantagesPerToken,
            @Const FloatPointer refLogprob, @Const FloatPointer entropy, @Const DoublePointer entropyThreshold,
            FloatPointer loss, FloatPointer gradLogprob, FloatPointer gradEntropy, FloatPointer metrics);

    static native int gspo4j_entropy_threshold(
            int device, Pointer stream,
            long tokens, @Const FloatPointer entropy, @Cast("const uint8_t*") BytePointer mask,
            double rho, int checkFinite, DoublePointer threshold);

    static native int gspo4j_group_advantages(
            int device, Pointer stream,
            long count, @Const FloatPointer rewards, long groupSize, @Cast("const int64_t*") LongPointer groupIds,
            int mode, double eps, int checkFinite, FloatPointer advantages);

    static native int gspo4j_gae(
            int device, Pointer stream,
            long batch, long seq, long tokens, @Cast("const int64_t*") LongPointer offsets,
            @Const FloatPointer rewards, @Const FloatPointer values, @Cast("const uint8_t*") BytePointer mask,
            double gamma, double lambda, int checkFinite,
            FloatPointer advantages, FloatPointer returns);
}
