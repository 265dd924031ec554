package dev.gspo4j.examples;

import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.PolicyLoss;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * A shortened demo run: the reward must rise by a clear margin. It catches what unit tests cannot
 * see, such as a sign error in the loss, a wrong scale, or advantages that do not reach the policy.
 */
class DigitsDemoTest {

    @Test
    void gspoAndGrpoLearnTheTask(@TempDir Path out) throws Exception {
        DigitsDemo.useThreads(DigitsDemo.defaultThreads()); // as the demo's main does
        final DigitsDemo.Config config = DigitsDemo.Config.defaults().withSteps(70);
        final DigitsDemo.Curve gspo = DigitsDemo.train("GSPO", PolicyLoss.gspo(), config, false);
        final DigitsDemo.Curve grpo = DigitsDemo.train("GRPO", PolicyLoss.grpo(), config, false);
        System.out.printf("GSPO reward %.3f -> %.3f, GRPO reward %.3f -> %.3f%n", gspo.startReward(), gspo.endReward(),
                grpo.startReward(), grpo.endReward());
        // A random policy scores 0.1; a sign error drives the reward below it.
        assertTrue(gspo.startReward() < 0.15, "GSPO starts near chance: " + gspo.startReward());
        assertTrue(gspo.endReward() > gspo.startReward() + 0.15, "GSPO learns: " + gspo.startReward() + " -> " + gspo.endReward());
        assertTrue(grpo.endReward() > grpo.startReward() + 0.15, "GRPO learns: " + grpo.startReward() + " -> " + grpo.endReward());
        final Path png = out.resolve("rewards.png");
        DigitsDemo.plot(png, gspo, grpo);
        assertTrue(Files.size(png) > 5_000, "a plot was written");
    }
}
