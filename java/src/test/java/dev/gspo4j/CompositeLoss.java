package dev.gspo4j;

import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.RatioLevel;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.ScalarOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * The plain libtorch composite a Java user would write: log_softmax + gather for the log-probs,
 * the SPEC.md formulas in tensor ops, differentiated by libtorch's autograd. Padded layout only
 * ([B, T, V] logits, [B, T] per-token tensors); the packed layout is checked against the padded one.
 */
public final class CompositeLoss {
    private CompositeLoss() {}

    public record Output(Tensor loss, Tensor logProbs, Tensor entropy) {}

    static ScalarOptional s(double v) {
        return new ScalarOptional(new Scalar(v));
    }

    static Scalar sc(double v) {
        return new Scalar(v);
    }

    /**
     * @param logits [B, T, V], any float dtype (the composite runs in it; pass float64 for a reference)
     * @param mask [B, T] float 0/1
     * @param oldLogProbs [B, T] or null (on-policy)
     * @param advantages [B] or [B, T]
     */
    public static Output compute(LossSettings st, double temperature, Tensor logits, Tensor targets, Tensor mask, Tensor oldLogProbs,
            Tensor refLogProbs, Tensor advantages, boolean tokenAdvantages) {
        final ScalarType type = logits.scalar_type();
        final Tensor logSoftmax = logits.div(sc(temperature)).log_softmax(-1);
        final Tensor tokenLogProbs = logSoftmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1);
        // A -Inf logit has p = 0 and adds 0 to the entropy: p * log p with log p's -Inf replaced by
        // the dtype's lowest finite value (nan_to_num, whose gradient there is 0), so 0 * -Inf never
        // makes a NaN in the value or the gradient.
        final Tensor entropy = logSoftmax.exp().mul(logSoftmax.nan_to_num()).sum(new long[] {-1}).neg();
        final Tensor m = mask.to(type);
        // Masked tokens take no part: a masked -Inf log-prob (its target logit -Inf) must not
        // reach 0 * -Inf below; masked_fill gives those positions no gradient either.
        final Tensor lp = tokenLogProbs.masked_fill(m.eq(sc(0)), sc(0));
        final Tensor olp = oldLogProbs == null ? lp.detach() : oldLogProbs.to(type);
        final Tensor adv = advantages.to(type);
        final Tensor lengths = m.sum(new long[] {1});
        final Tensor valid = lengths.gt(sc(0)).to(type);
        final Tensor responses = valid.sum();
        final double r = st.logRatioClamp();
        final long batch = logits.size(0);
        final long seq = logits.size(1);

        // weights w[b, t] of the aggregation (0 for empty responses)
        final double norm = st.normalizer();
        final Tensor responseDenominator = norm > 0 ? responses.mul(sc(0)).add(sc(norm)) : responses;
        final Tensor weight;
        switch (st.aggregation()) {
            case SEQ_MEAN_TOKEN_MEAN -> weight = m.div(lengths.clamp(s(1), new ScalarOptional()).unsqueeze(1)).div(responseDenominator.clamp(s(1e-30), new ScalarOptional()));
            case TOKEN_MEAN -> weight = m.div((norm > 0 ? m.sum().mul(sc(0)).add(sc(norm)) : m.sum()).clamp(s(1e-30), new ScalarOptional()));
            case SEQ_MEAN_TOKEN_SUM -> weight = m.div(responseDenominator.clamp(s(1e-30), new ScalarOptional()));
            default -> {
                final double lengthNorm = st.lengthNorm() > 0 ? st.lengthNorm() : seq;
                weight = m.div(sc((norm > 0 ? norm : batch) * lengthNorm));
            }
        }

        final Tensor surrogate;
        if (st.ratioLevel() == RatioLevel.SEQUENCE) {
            final Tensor logS = m.mul(lp.sub(olp)).sum(new long[] {1}).div(lengths.clamp(s(1), new ScalarOptional()));
            final Tensor ratio = logS.clamp(s(-r), s(r)).exp();
            final Tensor j = objective(st, ratio, adv);
            surrogate = j.mul(valid).sum().div(responseDenominator.clamp(s(1e-30), new ScalarOptional()));
        } else {
            final Tensor ratio;
            final Tensor a = tokenAdvantages ? adv : adv.unsqueeze(1).expand(batch, seq);
            if (st.ratioLevel() == RatioLevel.TOKEN) {
                ratio = lp.sub(olp).clamp(s(-r), s(r)).exp();
            } else {
                final Tensor logS = m.mul(lp.sub(olp)).sum(new long[] {1}).div(lengths.clamp(s(1), new ScalarOptional()));
                // log s_bt = sg(log s_b) + lp - sg(lp), clamped as a whole (as verl clamps it): the
                // value is s_b's, and outside [-R, R] the token's gradient is 0 like any clamped ratio.
                ratio = logS.detach().unsqueeze(1).add(lp.sub(lp.detach())).clamp(s(-r), s(r)).exp();
            }
            surrogate = weight.mul(objective(st, ratio, a)).sum();
        }
        Tensor loss = surrogate.neg();
        if (st.klCoef() != 0) {
            final Tensor d = refLogProbs.to(type).sub(lp).clamp(s(-r), s(r));
            final Tensor k = switch (st.klEstimator()) {
                case K1 -> d.neg();
                case K2 -> d.mul(d).mul(sc(0.5));
                case K3 -> d.exp().sub(d).sub(sc(1));
            };
            loss = loss.add(weight.mul(k).sum().mul(sc(st.klCoef())));
        }
        if (st.entropyCoef() != 0) {
            loss = loss.sub(weight.mul(entropy).sum().mul(sc(st.entropyCoef())));
        }
        return new Output(loss, tokenLogProbs.detach(), entropy.detach());
    }

    static Tensor objective(LossSettings st, Tensor ratio, Tensor advantage) {
        final Tensor clipped = ratio.clamp(s(1 - st.epsLow()), s(1 + st.epsHigh()));
        Tensor j = ratio.mul(advantage).minimum(clipped.mul(advantage));
        if (st.dualClip() > 0) {
            final Tensor dual = j.maximum(advantage.mul(sc(st.dualClip())));
            j = torch.where(advantage.lt(sc(0)), dual, j);
        }
        return j;
    }
}
