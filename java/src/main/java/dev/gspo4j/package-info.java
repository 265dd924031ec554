/**
 * Fused policy losses for reinforcement-learning post-training of language models on libtorch
 * (the JavaCPP PyTorch presets): GSPO, GSPO-token, GRPO, PPO, DAPO, Dr. GRPO, CISPO, SAPO, GMPO,
 * LUSPO, VESPO and DPPO, with their advantages.
 *
 * <p>Start with {@link dev.gspo4j.PolicyLoss} (a builder per objective), give it a {@link
 * dev.gspo4j.LossInput} (logits {@code [B, T, V]} or packed {@code [N, V]}, float32, bfloat16 or
 * float16, on the CPU or a CUDA device, and per-token tensors of the same layout on the same
 * device), and use the {@link dev.gspo4j.LossResult}: a differentiable loss, detached log-probs and
 * entropy, and {@link dev.gspo4j.LossMetrics}. {@link dev.gspo4j.Advantages} turns rewards into
 * advantages; {@link dev.gspo4j.TokenLogProbs} scores the old and reference policies; {@link
 * dev.gspo4j.Gspo4j} sets the CPU threads and describes the loaded native library ({@link
 * dev.gspo4j.Gspo4j#info()}).
 *
 * <p>The math is <a href="https://github.com/gspo4j/gspo4j/blob/main/docs/math.md">docs/math.md</a>
 * of the repository. Natives: linux-x86_64 only (glibc 2.28+), from the jar {@code
 * dev.gspo4j:gspo4j:linux-x86_64} (CPU) or {@code linux-x86_64-gpu} (CPU and CUDA), or {@code
 * dev.gspo4j:gspo4j-platform}. Packages other than this one are internal.
 */
package dev.gspo4j;
