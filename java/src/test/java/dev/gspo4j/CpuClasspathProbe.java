package dev.gspo4j;

import java.lang.reflect.Method;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Child-JVM main of {@link CpuClasspathTest}: runs every public entry point on CPU tensors (both
 * backward paths, advantages, GAE), then prints how many of the CUDA-only classes the JVM loaded.
 * Needs {@code --add-opens java.base/java.lang=ALL-UNNAMED} to ask the class loader.
 */
public final class CpuClasspathProbe {
    static final String[] CUDA_CLASSES = {
        "dev.gspo4j.internal.CudaStreams",
        "org.bytedeco.pytorch.global.torch_cuda",
        "org.bytedeco.pytorch.cuda.CUDAStream",
        "org.bytedeco.cuda.cudart.CUstream_st",
    };

    private CpuClasspathProbe() {}

    public static void main(String[] args) throws Exception {
        torch.manual_seed(0);
        try (Tensor logits = torch.randn(2, 5, 11).set_requires_grad(true);
                Tensor targets = torch.randint(11, new long[] {2, 5}, new TensorOptions(ScalarType.Long));
                Tensor rewards = Tensor.create(1f, 0f, 0.5f, 0.25f);
                Tensor advantages = Advantages.group(rewards, 2, AdvantageMode.MEAN_STD);
                Tensor sequenceAdvantages = advantages.narrow(0, 0, 2)) {
            for (PolicyLoss loss : new PolicyLoss[] {PolicyLoss.gspo().build(), PolicyLoss.grpo().build()}) {
                try (LossResult result = loss.compute(LossInput.builder().logits(logits).targets(targets)
                        .advantages(sequenceAdvantages).build())) {
                    result.loss().backward();
                }
                try (LossResult result = loss.compute(LossInput.builder().logits(logits).targets(targets)
                        .advantages(sequenceAdvantages).build())) {
                    result.backward();
                }
            }
            try (Tensor values = torch.randn(2, 5); Tensor tokenRewards = torch.randn(2, 5);
                    Advantages.Gae gae = Advantages.gae(tokenRewards, values, null, 0.99, 0.95)) {
                System.out.println("gae=" + gae.advantages().numel());
            }
        }
        final Method findLoaded = ClassLoader.class.getDeclaredMethod("findLoadedClass", String.class);
        findLoaded.setAccessible(true);
        int loaded = 0;
        for (String name : CUDA_CLASSES) {
            for (ClassLoader loader = CpuClasspathProbe.class.getClassLoader(); loader != null; loader = loader.getParent()) {
                if (findLoaded.invoke(loader, name) != null) {
                    System.out.println("loaded: " + name);
                    loaded++;
                    break;
                }
            }
        }
        System.out.println("cudaClasses=" + loaded);
        // The control: a class the CPU path does load must be found the same way.
        System.out.println("control=" + (findLoaded.invoke(CpuClasspathProbe.class.getClassLoader(), "dev.gspo4j.internal.Kernels") != null ? 1 : 0));
    }
}
