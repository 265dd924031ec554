package dev.gspo4j;

import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.Metric;
import dev.gspo4j.internal.Objective;
import dev.gspo4j.internal.RatioLevel;
import dev.gspo4j.internal.Tensors;
import dev.gspo4j.internal.TokenWeights;
import dev.gspo4j.internal.Unscoped;
import java.time.Duration;
import org.bytedeco.javacpp.chrono.Milliseconds;
import org.bytedeco.pytorch.AllreduceOptions;
import org.bytedeco.pytorch.Backend;
import org.bytedeco.pytorch.GlooDeviceVector;
import org.bytedeco.pytorch.ProcessGroupGloo;
import org.bytedeco.pytorch.ReduceOp;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Store;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorVector;
import org.bytedeco.pytorch.Work;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Data-parallel training on libtorch's c10d (SPEC.md "Data-parallel equivalence"): a batch split over
 * the ranks of a process group ({@code ProcessGroupGloo} on CPUs, {@code ProcessGroupNCCL} on GPUs,
 * both {@link Backend}s of the PyTorch presets), each rank computing the loss of its shard.
 *
 * <p>The contract, per step:
 * <ol>
 * <li>{@link #allReduceCounts} on every rank: one allreduce of what the aggregation divides by (B',
 *     the counted tokens, B and Lnorm's default).
 * <li>{@link PolicyLoss#compute(LossInput, GlobalCounts)} with those counts: each rank's loss is its
 *     share of the whole batch's loss, and <b>the ranks' losses sum to the single-process loss</b>.
 * <li>Backward, then <b>sum</b> the gradients over the ranks (an allreduce with {@code SUM}): that is
 *     the single-process gradient. A framework that <b>averages</b> them instead (DDP's default, a
 *     division by the world size) needs each rank's loss multiplied by the world size first.
 * <li>{@link #reduceMetrics} (optional): the step's metrics in one more allreduce.
 * </ol>
 * Every per-response quantity (L_b, GSPO's s_b, GMPO's rho_b, VESPO's W_b, SEQ_MEAN_TOKEN_MEAN's 1/L_b)
 * needs the whole response on one rank: shard by response, never inside one. Group advantages need
 * the whole group (or compute them before sharding). Every rank must call the same collectives in
 * the same order, including a rank whose shard is empty (its counts are 0, its loss and gradient 0).
 *
 * <p>Each collective waits at most its time-out; a rank that died or never arrives makes the others
 * throw {@link DataParallelException} (naming the operation, the rank and the time-out) instead of
 * hanging.
 */
public final class DataParallel {
    private static final int COUNT_SLOTS = 4; // B', tokens, B, longest
    private static final int METRIC_SLOTS = Metric.COUNT + 2; // the float32 set, sequences, tokens

    private DataParallel() {}

    /**
     * A Gloo process group of {@code size} ranks meeting through {@code store} (a {@code FileStore}
     * on a shared file system, or a {@code TCPStore}), its transport bound to {@code hostname}'s
     * address ("127.0.0.1" for one machine), every collective and the rendezvous itself bounded by
     * {@code timeout}. Blocks until every rank has joined.
     *
     * @param store the rendezvous store every rank opens ({@code FileStore} or {@code TCPStore})
     * @param rank this process's rank, in [0, size)
     * @param size the number of ranks
     * @param hostname the address Gloo's transport binds to
     * @param timeout the bound of the rendezvous and of every collective
     * @return the process group; the caller closes it
     * @throws DataParallelException when a rank does not join within the time-out
     */
    public static ProcessGroupGloo gloo(Store store, int rank, int size, String hostname, Duration timeout) {
        if (store == null) {
            throw new IllegalArgumentException("store must not be null");
        }
        if (size < 1 || rank < 0 || rank >= size) {
            throw new IllegalArgumentException("rank must be in [0, size) and size >= 1, got rank " + rank + " of " + size);
        }
        if (hostname == null || hostname.isEmpty()) {
            throw new IllegalArgumentException("hostname must name this host's address, e.g. 127.0.0.1");
        }
        final long millis = millis(timeout);
        try (Milliseconds limit = new Milliseconds(millis)) {
            final ProcessGroupGloo.Options options = ProcessGroupGloo.Options.create(limit);
            options.devices(new GlooDeviceVector(ProcessGroupGloo.createDeviceForHostname(hostname)));
            return new ProcessGroupGloo(store, rank, size, options);
        } catch (RuntimeException e) {
            throw new DataParallelException("rank " + rank + " of " + size + ": the Gloo rendezvous did not complete within "
                    + millis + " ms: a rank never joined, died, or uses another store (" + firstLine(e) + ")", e);
        }
    }

    /**
     * This call's own counts (no collective): for gradient accumulation, {@link GlobalCounts#plus}
     * adds them up.
     *
     * @param input one call's input, checked as {@link PolicyLoss#compute} checks it
     * @return its counts
     */
    public static GlobalCounts localCounts(LossInput input) {
        return Unscoped.call(() -> {
            try (Tensor local = localCountTensor(input); Tensor cpu = local.cpu(); Tensor c = cpu.contiguous()) {
                final double[] v = new double[COUNT_SLOTS];
                c.data_ptr_double().get(v);
                return new GlobalCounts((long) v[0], (long) v[1], (long) v[2], (long) v[3]);
            }
        });
    }

    /**
     * The step's counts over every rank of {@code group}, from this rank's input: one allreduce of a
     * small float64 tensor on the logits' device (Gloo: CPU; NCCL: the rank's GPU), then one read.
     * The counts are those the kernels use: a response counts when it has a counted token (mask and
     * {@link LossInput.Builder#ignoreIndex} applied), Lnorm's default is the largest T (padded) or the
     * longest response (packed) of any rank. The input is checked as {@link PolicyLoss#compute} checks it.
     *
     * @param group the c10d process group (Gloo or NCCL backend) of the data-parallel ranks
     * @param input this rank's input
     * @param timeout the bound of the allreduce
     * @return the step's counts, the same on every rank
     * @throws DataParallelException when the allreduce fails or does not finish within {@code timeout}
     */
    public static GlobalCounts allReduceCounts(Backend group, LossInput input, Duration timeout) {
        requireGroup(group);
        final long millis = millis(timeout);
        return Unscoped.call(() -> {
            try (Tensor local = localCountTensor(input)) {
                return reduceCounts(group, local, millis);
            }
        });
    }

    /**
     * {@link #allReduceCounts(Backend, LossInput, Duration)} from the mask alone: padded {@code [B, T]}
     * with {@code offsets} null, or packed {@code [N]} with {@code offsets} {@code [B + 1]}.
     *
     * @param group the c10d process group of the data-parallel ranks
     * @param mask this rank's 0/1 mask, {@code [B, T]} or {@code [N]}
     * @param offsets {@code [B + 1]} int64 token offsets of a packed batch, or null (padded)
     * @param timeout the bound of the allreduce
     * @return the step's counts, the same on every rank
     * @throws DataParallelException when the allreduce fails or does not finish within {@code timeout}
     */
    public static GlobalCounts allReduceCounts(Backend group, Tensor mask, Tensor offsets, Duration timeout) {
        requireGroup(group);
        final long millis = millis(timeout);
        TensorArgs.requireReadable(mask, "mask");
        return Unscoped.call(() -> {
            try (Tensor valid = PreparedInput.validMask(mask, "mask")) {
                final Tensor counts;
                if (offsets == null) {
                    if (valid.dim() != 2) {
                        throw new IllegalArgumentException("a padded mask must be [B, T] (or pass the packed offsets), got shape "
                                + PreparedInput.shapeOf(mask));
                    }
                    counts = countTensor(valid, null, valid.size(0), valid.size(1), valid);
                } else {
                    TensorArgs.requireOpen(offsets, "offsets");
                    if (valid.dim() != 1 || offsets.dim() != 1 || offsets.size(0) < 1) {
                        throw new IllegalArgumentException("a packed mask must be [N] with offsets [B + 1], got shapes "
                                + PreparedInput.shapeOf(mask) + " and " + PreparedInput.shapeOf(offsets));
                    }
                    try (Tensor longs = offsets.to(ScalarType.Long)) {
                        counts = countTensor(valid, longs, offsets.size(0) - 1, valid.size(0), valid);
                    }
                }
                try (Tensor local = counts) {
                    return reduceCounts(group, local, millis);
                }
            }
        });
    }

    /**
     * The step's metrics: this rank's {@code metrics} (of a {@link PolicyLoss#compute(LossInput,
     * GlobalCounts)} with {@code loss}) combined with every other rank's in one allreduce. The loss,
     * KL and entropy terms are summed (each rank's is its share of the step's); clip fractions are
     * weighted by each rank's clip decisions, ratio statistics by its ratios (min and max over the
     * ranks that have one), the approximate KL and the mean entropy by its counted tokens; the counts
     * are summed exactly. The same numbers as one call on the whole batch, up to float32 rounding.
     * The caller closes the result.
     *
     * @param group the c10d process group of the data-parallel ranks
     * @param loss the loss whose call produced {@code metrics}
     * @param metrics this rank's metrics
     * @param timeout the bound of the allreduce
     * @return the step's metrics
     * @throws DataParallelException when the allreduce fails or does not finish within {@code timeout}
     */
    public static LossMetrics reduceMetrics(Backend group, PolicyLoss loss, LossMetrics metrics, Duration timeout) {
        requireGroup(group);
        if (loss == null || metrics == null) {
            throw new IllegalArgumentException("loss and metrics must not be null");
        }
        final long millis = millis(timeout);
        final int size = group.getSize();
        final double[] all = Unscoped.call(() -> {
            try (Tensor mine = metrics.asDoubles()) {
                return gather(group, mine, METRIC_SLOTS, millis, "reduceMetrics");
            }
        });
        final float[] values = combineMetrics(loss.settings(), all, size);
        long sequences = 0;
        long tokens = 0;
        for (int r = 0; r < size; r++) {
            sequences += (long) all[r * METRIC_SLOTS + Metric.COUNT];
            tokens += (long) all[r * METRIC_SLOTS + Metric.COUNT + 1];
        }
        values[Metric.SEQUENCES.index()] = sequences;
        values[Metric.TOKENS.index()] = tokens;
        final Tensor tensor = Unscoped.call(() -> {
            try (Tensor raw = torch.empty(Metric.COUNT); Tensor typed = raw.to(ScalarType.Float)) {
                final Tensor t = typed.contiguous();
                t.data_ptr_float().put(values);
                return t;
            }
        });
        return new LossMetrics(tensor, null, sequences, null, tokens);
    }

    // Each rank's metric slots, combined as one call on the whole batch would have computed them.
    static float[] combineMetrics(LossSettings settings, double[] all, int size) {
        final boolean perResponseDecisions = settings.ratioLevel() == RatioLevel.SEQUENCE
                && settings.objective().objective() != Objective.GMPO;
        final boolean perResponseRatios = settings.ratioLevel() != RatioLevel.TOKEN
                || settings.objective().objective() == Objective.VESPO;
        final float[] out = new float[Metric.COUNT];
        for (Metric metric : Metric.values()) {
            double sum = 0;
            double weight = 0;
            double min = Double.POSITIVE_INFINITY;
            double max = Double.NEGATIVE_INFINITY;
            for (int r = 0; r < size; r++) {
                final double v = all[r * METRIC_SLOTS + metric.index()];
                final double responses = all[r * METRIC_SLOTS + Metric.COUNT];
                final double tokens = all[r * METRIC_SLOTS + Metric.COUNT + 1];
                final double w = switch (metric) {
                    case POLICY_LOSS, KL, ENTROPY, SEQUENCES, TOKENS -> 1;
                    case CLIP_FRACTION_LOW, CLIP_FRACTION_HIGH, DUAL_CLIP_FRACTION -> perResponseDecisions ? responses : tokens;
                    case RATIO_MEAN, RATIO_MIN, RATIO_MAX -> perResponseRatios ? responses : tokens;
                    case APPROX_KL, ENTROPY_MEAN, ROLLOUT_WEIGHT_MEAN, ROLLOUT_MASKED_FRACTION, ROLLOUT_KL, ROLLOUT_K3_KL,
                            ENTROPY_KEPT_FRACTION -> tokens;
                    case ROLLOUT_SEQ_MASKED_FRACTION -> responses;
                };
                if (w > 0) {
                    sum += v * w;
                    weight += w;
                    min = Math.min(min, v);
                    max = Math.max(max, v);
                }
            }
            final double value = switch (metric) {
                case POLICY_LOSS, KL, ENTROPY, SEQUENCES, TOKENS -> sum;
                case RATIO_MIN -> weight > 0 ? min : 0;
                case RATIO_MAX -> weight > 0 ? max : 0;
                default -> weight > 0 ? sum / weight : 0;
            };
            out[metric.index()] = (float) value;
        }
        return out;
    }

    // B', tokens, B and Lnorm's default of one input, as float64 [4] on the logits' device (no sync).
    private static Tensor localCountTensor(LossInput input) {
        if (input == null) {
            throw new IllegalArgumentException("input must not be null");
        }
        // The checks and the mask (ignoreIndex applied) the loss itself uses; GRPO's settings accept
        // either kind of advantages (and, with top-entropy selection, the caller's threshold), and
        // these counts do not depend on the objective.
        final LossSettings accepting = input.entropyThreshold == null ? LossSettings.grpo()
                : LossSettings.grpo().withWeights(TokenWeights.NONE.withTopEntropy(1.0));
        try (PreparedInput in = PreparedInput.of(input, accepting, 1.0)) {
            return countTensor(in.mask, in.offsets(), in.layout.batch(), in.layout.seq(), input.logits);
        }
    }

    // mask: bool [B, T] or [N], or null (every token counts); offsets: int64 [B + 1] or null (padded).
    private static Tensor countTensor(Tensor mask, Tensor offsets, long batch, long seq, Tensor like) {
        final Tensor out = Tensors.empty(new long[] {COUNT_SLOTS}, ScalarType.Double, like);
        try (Scalar zero = new Scalar(0L)) {
            out.zero_();
            if (offsets == null) {
                // Padded: Lnorm's default is T.
                if (mask == null) {
                    fill(out, 0, seq > 0 ? batch : 0);
                    fill(out, 1, batch * seq);
                } else {
                    try (Tensor lengths = mask.sum(1L);
                            Tensor nonEmpty = lengths.gt(zero)) {
                        put(out, 0, nonEmpty);
                        put(out, 1, lengths);
                    }
                }
                fill(out, 3, seq);
            } else {
                try (Tensor ends = offsets.narrow(0, 1, batch); Tensor starts = offsets.narrow(0, 0, batch);
                        Tensor spans = ends.sub(starts)) {
                    final Tensor lengths;
                    if (mask == null) {
                        lengths = spans.clone();
                    } else {
                        // Counted tokens of response b: prefix[offsets[b + 1]] - prefix[offsets[b]].
                        final long tokens = mask.size(0);
                        try (Tensor prefix = Tensors.empty(new long[] {tokens + 1}, ScalarType.Long, mask);
                                Tensor head = prefix.narrow(0, 0, 1); Tensor tail = prefix.narrow(0, 1, tokens);
                                Tensor running = mask.cumsum(0)) {
                            head.zero_();
                            tail.copy_(running);
                            try (Tensor e = prefix.index_select(0, ends); Tensor s = prefix.index_select(0, starts)) {
                                lengths = e.sub(s);
                            }
                        }
                    }
                    try (Tensor l = lengths; Tensor nonEmpty = l.gt(zero)) {
                        put(out, 0, nonEmpty);
                        put(out, 1, l);
                    }
                    if (batch > 0) {
                        try (Tensor longest = spans.max(); Tensor slot = out.narrow(0, 3, 1); Tensor flat = longest.reshape(1)) {
                            slot.copy_(flat);
                        }
                    }
                }
            }
            fill(out, 2, batch);
            return out;
        } catch (RuntimeException | Error e) {
            out.close();
            throw e;
        }
    }

    private static void put(Tensor out, long index, Tensor values) {
        try (Tensor sum = values.sum(); Tensor flat = sum.reshape(1); Tensor slot = out.narrow(0, index, 1)) {
            slot.copy_(flat);
        }
    }

    private static void fill(Tensor out, long index, long value) {
        try (Tensor slot = out.narrow(0, index, 1); Scalar v = new Scalar((double) value)) {
            slot.fill_(v);
        }
    }

    private static GlobalCounts reduceCounts(Backend group, Tensor local, long millis) {
        final int size = group.getSize();
        final double[] all = gather(group, local, COUNT_SLOTS, millis, "allReduceCounts");
        long responses = 0;
        long tokens = 0;
        long batch = 0;
        long longest = 0;
        for (int r = 0; r < size; r++) {
            responses += (long) all[r * COUNT_SLOTS];
            tokens += (long) all[r * COUNT_SLOTS + 1];
            batch += (long) all[r * COUNT_SLOTS + 2];
            longest = Math.max(longest, (long) all[r * COUNT_SLOTS + 3]);
        }
        return new GlobalCounts(responses, tokens, batch, longest);
    }

    // Every rank's `slots` float64 values, through ONE allreduce (SUM) of a [size * slots] tensor in
    // which each rank fills its own row and leaves the others 0: adding zeros is exact, so this is an
    // all-gather that any backend's allreduce does, and sums, maxima and minima are taken here.
    private static double[] gather(Backend group, Tensor mine, int slots, long millis, String what) {
        final int size = group.getSize();
        final int rank = group.getRank();
        try (Tensor rows = Tensors.empty(new long[] {(long) size * slots}, ScalarType.Double, mine)) {
            rows.zero_();
            try (Tensor own = rows.narrow(0, (long) rank * slots, slots)) {
                own.copy_(mine);
            }
            allReduceSum(group, rows, millis, what);
            try (Tensor cpu = rows.cpu(); Tensor c = cpu.contiguous()) {
                final double[] all = new double[size * slots];
                c.data_ptr_double().get(all);
                return all;
            }
        }
    }

    /**
     * Top-entropy selection's threshold for the whole step: the {@code 1 - rho} quantile (numpy's
     * linear method, float64, as {@link PolicyLoss.Builder#topEntropyQuantile}) of the counted
     * entropies of every rank, as TRL takes it over all processes. Pass the result to {@link
     * LossInput.Builder#entropyThreshold} on every rank: each then selects by the same threshold,
     * which data-parallel equivalence needs (a rank's own quantile is not the step's). The
     * entropies come from a forward before the loss ({@link TokenLogProbs#computeWithEntropy} with
     * the loss's temperature: one more read of the logits). Two allreduces: the ranks' counts, then
     * their values (each rank fills its own slice of a zeroed float32 vector: adding zeros is exact);
     * the quantile is taken on the tensors' device by the same kernel as a single call's. Returns to
     * the host, so on CUDA it waits for the GPU, as the step's other collectives do.
     *
     * @param group the c10d process group of the data-parallel ranks
     * @param entropy float32 per-token entropies of this rank, any shape, on the device the backend
     *     serves
     * @param mask the loss's mask, of the same number of elements (nonzero counts), or null (every
     *     token counts)
     * @param rho the kept fraction, in (0, 1]
     * @param timeout the bound of each allreduce
     * @return the step's threshold; +Infinity when no rank has a counted token
     * @throws NonFiniteDataException when a counted entropy is NaN
     * @throws DataParallelException when an allreduce fails or does not finish within {@code timeout}
     */
    public static double entropyThreshold(Backend group, Tensor entropy, Tensor mask, double rho, Duration timeout) {
        requireGroup(group);
        TensorArgs.requireOpen(entropy, "entropy");
        if (entropy.scalar_type().intern() != ScalarType.Float) {
            throw new IllegalArgumentException("entropy must be float32 (as TokenLogProbs and LossResult give it), got "
                    + PreparedInput.typeName(entropy));
        }
        if (mask != null) {
            TensorArgs.requireOpen(mask, "mask");
            if (mask.numel() != entropy.numel()) {
                throw new IllegalArgumentException("mask has " + mask.numel() + " elements, entropy " + entropy.numel()
                        + ": give the loss's mask of the same tokens");
            }
        }
        if (!(rho > 0 && rho <= 1)) {
            throw new IllegalArgumentException("rho must be in (0, 1], got " + rho);
        }
        final long millis = millis(timeout);
        final int size = group.getSize();
        final int rank = group.getRank();
        try (Tensor flat = entropy.detach().reshape(-1); Tensor keep = mask == null ? null : counted(mask);
                Tensor own = keep == null ? new Tensor(flat) : flat.masked_select(keep);
                Tensor count = Tensors.empty(new long[] {1}, ScalarType.Double, entropy)) {
            fill(count, 0, own.numel());
            final double[] counts = gather(group, count, 1, millis, "entropyThreshold");
            long total = 0;
            long before = 0;
            for (int r = 0; r < size; r++) {
                before += r < rank ? (long) counts[r] : 0;
                total += (long) counts[r];
            }
            if (total == 0) {
                return Double.POSITIVE_INFINITY;
            }
            try (Tensor values = Tensors.empty(new long[] {total}, ScalarType.Float, entropy);
                    Tensor threshold = Tensors.empty(new long[] {1}, ScalarType.Double, entropy)) {
                values.zero_();
                if (own.numel() > 0) {
                    try (Tensor slot = values.narrow(0, before, own.numel())) {
                        slot.copy_(own);
                    }
                }
                allReduceSum(group, values, millis, "entropyThreshold");
                dev.gspo4j.internal.Kernels.entropyThreshold(Tensors.device(entropy), Tensors.stream(entropy), total,
                        Tensors.floats(values), null, rho, false, Tensors.doubles(threshold));
                final double value = threshold.item_double();
                if (Double.isNaN(value)) {
                    throw new NonFiniteDataException("entropyThreshold: a counted entropy is NaN on one of the " + size
                            + " ranks (checked on rank " + rank + ")", null);
                }
                return value;
            }
        }
    }

    // The mask's counted tokens as a flat bool tensor.
    private static Tensor counted(Tensor mask) {
        try (Tensor flat = mask.reshape(-1); Scalar zero = new Scalar(0.0)) {
            return flat.ne(zero);
        }
    }

    /**
     * Sums {@code tensor} in place over the ranks of {@code group} (one allreduce): the gradients of
     * the ranks' shares, after backward, to give the single-process gradient. The tensor must be
     * dense and contiguous, on the device the backend serves (Gloo: CPU; NCCL: this rank's GPU).
     *
     * @param group the c10d process group of the data-parallel ranks
     * @param tensor summed in place
     * @param timeout the bound of the allreduce
     * @throws DataParallelException when the allreduce fails or does not finish within {@code timeout}
     */
    public static void allReduceSum(Backend group, Tensor tensor, Duration timeout) {
        requireGroup(group);
        TensorArgs.requireOpen(tensor, "tensor");
        if (!tensor.is_contiguous()) {
            throw new IllegalArgumentException("tensor must be contiguous (the allreduce writes its memory in place)");
        }
        allReduceSum(group, tensor, millis(timeout), "allReduceSum");
    }

    private static void allReduceSum(Backend group, Tensor t, long millis, String what) {
        final String where = what + " on rank " + group.getRank() + " of " + group.getSize();
        boolean done;
        try (Milliseconds limit = new Milliseconds(millis); ReduceOp sum = new ReduceOp(ReduceOp.RedOpType.SUM);
                AllreduceOptions options = new AllreduceOptions(); TensorVector tensors = new TensorVector(t)) {
            options.reduceOp(sum);
            options.timeout(limit);
            try (Work work = group.allreduce(tensors, options)) {
                done = work._wait(limit);
            } catch (RuntimeException e) {
                throw new DataParallelException(where + ": the allreduce failed within its time-out of " + millis
                        + " ms: another rank died, left, or is not at this step (" + firstLine(e) + ")", e);
            }
        }
        if (!done) {
            throw new DataParallelException(where + ": the allreduce did not finish within " + millis
                    + " ms: another rank is not at this step", null);
        }
    }

    private static String firstLine(Throwable e) {
        final String message = String.valueOf(e.getMessage());
        final int newline = message.indexOf('\n');
        return newline < 0 ? message : message.substring(0, newline);
    }

    private static void requireGroup(Backend group) {
        if (group == null || group.isNull()) {
            throw new IllegalArgumentException("group must be a c10d process group (ProcessGroupGloo, ProcessGroupNCCL)");
        }
    }

    private static long millis(Duration timeout) {
        if (timeout == null || timeout.isNegative() || timeout.isZero()) {
            throw new IllegalArgumentException("timeout must be positive, got " + timeout);
        }
        return Math.max(1, timeout.toMillis());
    }
}
