package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertEquals;

import dev.gspo4j.Aggregation;
import org.bytedeco.javacpp.FloatPointer;
import org.junit.jupiter.api.Test;

/**
 * Each further objective on one response of two tokens, against its anchor's formula written out
 * by hand (TRL's grpo_trainer and verl's core_algos, as read; docs/math.md "Further objectives"):
 * lp = (-1, -2), olp = (-1.2, -1.5), so the token log-ratios are 0.2 and -0.5.
 */
public class ObjectiveAnchorsTest {
    static final double[] LP = {-1.0, -2.0};
    static final double[] OLP = {-1.2, -1.5};

    /** {loss, dLoss/dlp_0, dLoss/dlp_1} of the native CPU kernel for one response with advantage a. */
    static double[] run(LossSettings settings, double a) {
        try (FloatPointer lp = NativeBuffers.floats(LP); FloatPointer olp = NativeBuffers.floats(OLP);
                FloatPointer adv = NativeBuffers.floats(new double[] {a}); FloatPointer loss = NativeBuffers.floats(1, Float.NaN);
                FloatPointer grad = NativeBuffers.floats(2, Float.NaN); FloatPointer metrics = NativeBuffers.floats(Metric.COUNT, Float.NaN)) {
            Kernels.policyLoss(Device.CPU, null, settings, TokenLayout.padded(1, 2), lp, olp, null, adv, false, null, null, loss, grad,
                    null, metrics);
            return new double[] {loss.get(0), grad.get(0), grad.get(1)};
        }
    }

    static LossSettings of(Objective objective, RatioLevel level) {
        return LossSettings.grpo().withObjective(ObjectiveParams.of(objective), level);
    }

    static void expect(double[] want, double[] got, String what) {
        for (int i = 0; i < 3; i++) {
            assertEquals(want[i], got[i], 1e-6 * Math.max(1, Math.abs(want[i])), what + (i == 0 ? " loss" : " dLoss/dlp_" + (i - 1)));
        }
    }

    static double lp(int i) {
        return (float) LP[i];
    }

    static double ratio(int i) {
        return Math.exp((double) (float) LP[i] - (float) OLP[i]);
    }

    static double sigmoid(double x) {
        return 1 / (1 + Math.exp(-x));
    }

    @Test
    void cispo() {
        // TRL: -clamp(coef_1, max=cap).detach() * A * lp, token mean; gspo4j's default cap 1 + 4.
        final LossSettings s = of(Objective.CISPO, RatioLevel.TOKEN).withClip(1, 4).withAggregation(Aggregation.TOKEN_MEAN);
        final double a = 0.5;
        expect(new double[] {-(ratio(0) * a * lp(0) + ratio(1) * a * lp(1)) / 2, -ratio(0) * a / 2, -ratio(1) * a / 2}, run(s, a), "CISPO");
        // A cap of 1.1 cuts token 0's weight (1.22) and keeps its gradient at 1.1 A.
        final LossSettings capped = s.withClip(1, 0.1);
        expect(new double[] {-(1.1 * a * lp(0) + ratio(1) * a * lp(1)) / 2, -1.1 * a / 2, -ratio(1) * a / 2}, run(capped, a), "CISPO capped");
    }

    @Test
    void sapo() {
        // verl: gates = sigmoid(tau (r - 1)) * 4 / tau, tau_pos for A > 0 else tau_neg; seq-mean-token-mean.
        final LossSettings s = of(Objective.SAPO, RatioLevel.TOKEN);
        for (double a : new double[] {0.5, -0.7}) {
            final double tau = a > 0 ? 1.0 : 1.05;
            final double[] want = new double[3];
            for (int i = 0; i < 2; i++) {
                final double g = sigmoid(tau * (ratio(i) - 1));
                want[0] -= 4 / tau * g * a / 2;
                want[1 + i] = -4 * g * (1 - g) * ratio(i) * a / 2;
            }
            expect(want, run(s, a), "SAPO A=" + a);
        }
    }

    @Test
    void gmpo() {
        // verl geo_mean: l = sgn(A) min(sgn(A) x, sgn(A) clamp(x, -0.4, 0.4)); ratio = exp(mean l); loss -A ratio.
        final LossSettings s = of(Objective.GMPO, RatioLevel.SEQUENCE).withClip(0.4, 0.4);
        final double x0 = Math.log(ratio(0));
        final double x1 = Math.log(ratio(1));
        // A > 0: the clip acts above 0.4 only; x = (0.2, -0.5) both pass, both get the gradient.
        double rho = Math.exp((x0 + x1) / 2);
        expect(new double[] {-0.5 * rho, -0.5 * rho / 2, -0.5 * rho / 2}, run(s, 0.5), "GMPO A>0");
        // A < 0: the clip acts below -0.4: token 1's -0.5 becomes -0.4 and loses its gradient.
        rho = Math.exp((x0 - 0.4) / 2);
        expect(new double[] {0.7 * rho, 0.7 * rho / 2, 0}, run(s, -0.7), "GMPO A<0");
    }

    @Test
    void luspo() {
        // TRL/Liger luspo: GSPO's term times the response length, averaged over responses.
        final LossSettings s = of(Objective.LUSPO, RatioLevel.SEQUENCE).withClip(2e-3, 2.5e-3);
        final double sb = Math.exp((Math.log(ratio(0)) + Math.log(ratio(1))) / 2); // 0.86: below 1 - 2e-3
        // A > 0 with s below the band: min(s A, clip(s) A) = s A, gradient kept.
        expect(new double[] {-2 * sb * 0.5, -0.5 * sb, -0.5 * sb}, run(s, 0.5), "LUSPO A>0");
        // A < 0: clip(s) A is the smaller, no gradient.
        expect(new double[] {-2 * (1 - 2e-3) * -0.7, 0, 0}, run(s, -0.7), "LUSPO A<0");
    }

    @Test
    void vespo() {
        // TRL get_gamma_weights: w = exp(sum log-ratio), phi = w^k exp(lambda (1 - w)); -phi A lp, token mean.
        final LossSettings s = of(Objective.VESPO, RatioLevel.TOKEN).withAggregation(Aggregation.TOKEN_MEAN);
        final double w = ratio(0) * ratio(1);
        for (double a : new double[] {0.5, -0.7}) {
            final double phi = a >= 0 ? Math.pow(w, 2) * Math.exp(3 * (1 - w)) : Math.pow(w, 3) * Math.exp(2 * (1 - w));
            expect(new double[] {-phi * a * (lp(0) + lp(1)) / 2, -phi * a / 2, -phi * a / 2}, run(s, a), "VESPO A=" + a);
        }
    }

    @Test
    void dppo() {
        // verl dppo_tv / dppo_kl: -A * min(r, C).detach() * lp * valid, token mean.
        final double p0 = Math.exp(lp(0));
        final double q0 = Math.exp((float) OLP[0]);
        final double p1 = Math.exp(lp(1));
        final double q1 = Math.exp((float) OLP[1]);
        final LossSettings tv = of(Objective.DPPO_TV, RatioLevel.TOKEN).withAggregation(Aggregation.TOKEN_MEAN)
                .withObjectiveParams(ObjectiveParams.of(Objective.DPPO_TV).withDppoDivergence(0.05, 0.05));
        // A > 0: token 0 rose by p - p_old = 0.067 > 0.05 and is dropped; token 1 fell and is kept.
        assertEquals(true, p0 - q0 > 0.05 && p1 - q1 <= 0.05);
        expect(new double[] {-ratio(1) * 0.5 * lp(1) / 2, 0, -ratio(1) * 0.5 / 2}, run(tv, 0.5), "DPPO-TV A>0");
        // A < 0: token 1 fell by 0.088 > 0.05 and is dropped; a cap C = 1.1 cuts token 0's weight.
        final LossSettings tvCapped = tv.withObjectiveParams(tv.objective().withDppoRatioCap(1.1));
        expect(new double[] {-1.1 * -0.7 * lp(0) / 2, -1.1 * -0.7 / 2, 0}, run(tvCapped, -0.7), "DPPO-TV A<0 capped");
        final LossSettings kl = of(Objective.DPPO_KL, RatioLevel.TOKEN).withAggregation(Aggregation.TOKEN_MEAN)
                .withObjectiveParams(ObjectiveParams.of(Objective.DPPO_KL).withDppoDivergence(0.005, 0.005));
        final double kl0 = q0 * ((float) OLP[0] - lp(0)) + (1 - q0) * Math.log((1 - q0 + 1e-8) / (1 - p0 + 1e-8));
        final double kl1 = q1 * ((float) OLP[1] - lp(1)) + (1 - q1) * Math.log((1 - q1 + 1e-8) / (1 - p1 + 1e-8));
        // A > 0: token 0 rose with a binary KL above 0.005 (dropped); token 1 fell (kept whatever its KL).
        assertEquals(true, kl0 > 0.005 && kl1 > 0.005);
        expect(new double[] {-ratio(1) * 0.5 * lp(1) / 2, 0, -ratio(1) * 0.5 / 2}, run(kl, 0.5), "DPPO-KL A>0");
        // A < 0: the mirror image: token 1 fell with a KL above 0.005 (dropped), token 0 rose (kept).
        expect(new double[] {-ratio(0) * -0.7 * lp(0) / 2, -ratio(0) * -0.7 / 2, 0}, run(kl, -0.7), "DPPO-KL A<0");
    }
}
