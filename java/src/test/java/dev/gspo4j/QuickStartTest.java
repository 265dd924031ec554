package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.bytedeco.pytorch.AdamW;
import org.bytedeco.pytorch.AdamWOptions;
import org.bytedeco.pytorch.LinearImpl;
import org.bytedeco.pytorch.NoGradGuard;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/** The README's quick-start, compiled and run as written (the test checks the two stay the same). */
class QuickStartTest {

    @Test
    void quickStartRunsAndUpdatesThePolicy() throws Exception {
        torch.manual_seed(0);
        final float before;
        // quick-start begin
        LinearImpl policy = new LinearImpl(64, 1000); // a toy policy: an lm_head over fixed hidden states
        AdamW optimizer = new AdamW(policy.parameters(), new AdamWOptions(1e-2));
        PolicyLoss gspo = PolicyLoss.gspo().build();

        // A rollout: G = 4 responses to each of 2 prompts, 8 tokens each, rewarded by a verifier.
        Tensor hidden = torch.randn(8, 8, 64);
        Tensor tokens = torch.randint(1000, new long[] {8, 8}, new TensorOptions(ScalarType.Long));
        Tensor mask = torch.ones(8, 8);
        Tensor rewards = Tensor.create(1f, 0f, 0f, 1f, 0f, 0f, 0f, 1f);
        Tensor advantages = Advantages.group(rewards, 4, AdvantageMode.MEAN_STD);
        Tensor oldLogProbs; // what the sampler saw
        try (NoGradGuard noGrad = new NoGradGuard(); LossResult old = gspo.compute(LossInput.builder()
                .logits(policy.forward(hidden)).targets(tokens).mask(mask).advantages(advantages).build())) {
            oldLogProbs = old.logProbs().clone();
        }

        // One GSPO update.
        optimizer.zero_grad();
        try (LossResult result = gspo.compute(LossInput.builder().logits(policy.forward(hidden))
                .targets(tokens).mask(mask).oldLogProbs(oldLogProbs).advantages(advantages).build())) {
            result.loss().backward();
            optimizer.step();
            System.out.println("loss " + result.lossValue().item_float() + ", " + result.metrics());
        }
        // quick-start end
        before = oldLogProbs.sum().item_float();
        try (NoGradGuard noGrad = new NoGradGuard(); Tensor logits = policy.forward(hidden);
                LossResult after = gspo.compute(LossInput.builder().logits(logits).targets(tokens).mask(mask)
                        .oldLogProbs(oldLogProbs).advantages(advantages).build())) {
            assertNotEquals(before, after.logProbs().sum().item_float(), "the step moved the policy");
            assertEquals(8, after.metrics().sequences());
            assertTrue(Float.isFinite(after.lossValue().item_float()));
        }
    }

    @Test
    void readmeShowsThisCode() throws Exception {
        final String test = Files.readString(Path.of("src/test/java/dev/gspo4j/QuickStartTest.java"));
        final Matcher code = Pattern.compile("// quick-start begin\\n(.*?)\\n\\s*// quick-start end", Pattern.DOTALL).matcher(test);
        assertTrue(code.find());
        final String readme = Files.readString(Path.of("../README.md"));
        final Matcher block = Pattern.compile("## Quick start.*?```java\\n(.*?)```", Pattern.DOTALL).matcher(readme);
        assertTrue(block.find(), "README.md has a Quick start section with a java block");
        assertEquals(normalise(code.group(1)), normalise(block.group(1)), "README quick-start and QuickStartTest differ");
    }

    private static String normalise(String code) {
        return code.lines().map(String::strip).filter(l -> !l.isEmpty()).reduce("", (a, b) -> a + b + "\n");
    }
}
