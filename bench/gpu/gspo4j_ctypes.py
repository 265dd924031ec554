"""The C header of gspo4j (native/include/gspo4j/gspo4j.h) through ctypes, on torch tensors.

Every call passes libtorch's current CUDA stream (or NULL on the CPU), raises on a non-OK status
with the library's message, and never synchronises: check_error() does, and raises what the
kernels found in the data.
"""
import ctypes

import torch

OK, INVALID_ARGUMENT, OUT_OF_RANGE, NON_FINITE, UNSUPPORTED, CUDA, INTERNAL = range(7)
STATUS_NAMES = ["OK", "INVALID_ARGUMENT", "OUT_OF_RANGE", "NON_FINITE", "UNSUPPORTED", "CUDA", "INTERNAL"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
RATIO_TOKEN, RATIO_SEQUENCE, RATIO_SEQUENCE_TOKEN = 0, 1, 2
SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_SUM_NORM = 0, 1, 2, 3
KL_K1, KL_K2, KL_K3 = 0, 1, 2
MEAN_STD, MEAN, RLOO = 0, 1, 2
METRICS = ["policy_loss", "kl", "entropy", "clip_fraction_low", "clip_fraction_high", "dual_clip_fraction",
           "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "entropy_mean", "sequences", "tokens"]
# The kernel writes GSPO4J_METRIC_COUNT slots; the harness compares the first len(METRICS) (the six
# rollout/selection slots after them are 1 or 0 without those options).
METRIC_COUNT = 19

c_i32, c_i64, c_f64, c_p = ctypes.c_int32, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class Gspo4jError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(f"{STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else status}: {message}")
        self.status = status


class LossConfig(ctypes.Structure):
    _fields_ = [("ratio_level", c_i32), ("aggregation", c_i32), ("kl_estimator", c_i32), ("check_finite", c_i32),
                ("eps_low", c_f64), ("eps_high", c_f64), ("dual_clip", c_f64), ("log_ratio_clamp", c_f64),
                ("normalizer", c_f64), ("length_norm", c_f64), ("kl_coef", c_f64), ("entropy_coef", c_f64),
                ("objective", c_i32), ("reserved", c_i32), ("sapo_tau_pos", c_f64), ("sapo_tau_neg", c_f64),
                ("vespo_k_pos", c_f64), ("vespo_lambda_pos", c_f64), ("vespo_k_neg", c_f64), ("vespo_lambda_neg", c_f64),
                ("dppo_delta_low", c_f64), ("dppo_delta_high", c_f64), ("dppo_ratio_cap", c_f64),
                ("responses_total", c_f64), ("tokens_total", c_f64), ("batch_total", c_f64),
                ("rollout_level", c_i32), ("rollout_mode", c_i32), ("rollout_c_min", c_f64), ("rollout_c_max", c_f64),
                ("rejection_divergence", c_i32), ("rejection_scope", c_i32), ("rejection_low", c_f64),
                ("rejection_high", c_f64), ("off_policy_mask", c_i32), ("reserved2", c_i32), ("off_policy_delta", c_f64)]


def _ptr(t):
    return None if t is None else c_p(t.data_ptr())


class Library:
    def __init__(self, path):
        lib = ctypes.CDLL(path)
        lib.gspo4j_last_error.restype = ctypes.c_char_p
        lib.gspo4j_version.restype = ctypes.c_char_p
        lib.gspo4j_cpu_isa.restype = ctypes.c_char_p
        lib.gspo4j_cuda_device_count.restype = c_i32
        lib.gspo4j_cuda_runtime_version.restype = c_i32
        lib.gspo4j_cuda_check_error.argtypes = [c_p]
        lib.gspo4j_loss_config_init.argtypes = [ctypes.POINTER(LossConfig)]
        lib.gspo4j_token_logprob_forward.argtypes = [c_i32, c_p, c_p, c_i32, c_i64, c_i64, c_i64, c_i64, c_i64, c_p, c_f64,
                                                     c_i32, c_p, c_p, c_p]
        lib.gspo4j_token_logprob_backward.argtypes = [c_i32, c_p, c_p, c_i32, c_i64, c_i64, c_i64, c_i64, c_i64, c_p, c_f64,
                                                      c_p, c_p, c_p, c_p, c_p, c_i64, c_i64]
        lib.gspo4j_sequence_log_ratio.argtypes = [c_i32, c_p, c_i64, c_i64, c_i64, c_p, c_p, c_p, c_p, c_i32, c_p, c_p]
        lib.gspo4j_policy_loss.argtypes = [c_i32, c_p, ctypes.POINTER(LossConfig), c_i64, c_i64, c_i64, c_p, c_p, c_p, c_p,
                                           c_p, c_p, c_i32, c_p, c_p, c_p, c_p, c_p, c_p, c_p]
        lib.gspo4j_group_advantages.argtypes = [c_i32, c_p, c_i64, c_p, c_i64, c_p, c_i32, c_f64, c_i32, c_p]
        lib.gspo4j_gae.argtypes = [c_i32, c_p, c_i64, c_i64, c_i64, c_p, c_p, c_p, c_p, c_f64, c_f64, c_i32, c_p, c_p]
        for name in ["gspo4j_token_logprob_forward", "gspo4j_token_logprob_backward", "gspo4j_sequence_log_ratio",
                     "gspo4j_policy_loss", "gspo4j_group_advantages", "gspo4j_gae", "gspo4j_cuda_check_error",
                     "gspo4j_loss_config_init"]:
            getattr(lib, name).restype = c_i32
        self.lib = lib

    def _check(self, status):
        if status != OK:
            raise Gspo4jError(status, self.lib.gspo4j_last_error().decode())

    @staticmethod
    def _where(t):
        if t.is_cuda:
            return 1, c_p(torch.cuda.current_stream(t.device).cuda_stream)
        return 0, None

    def version(self):
        return self.lib.gspo4j_version().decode()

    def cuda_runtime_version(self):
        return self.lib.gspo4j_cuda_runtime_version()

    def check_error(self, device=None):
        stream = torch.cuda.current_stream(device).cuda_stream
        self._check(self.lib.gspo4j_cuda_check_error(c_p(stream)))

    def config(self, **options):
        c = LossConfig()
        self._check(self.lib.gspo4j_loss_config_init(ctypes.byref(c)))
        for key, value in options.items():
            setattr(c, key, value)
        return c

    @staticmethod
    def _logits_geometry(logits):
        """(batch, seq, vocab, stride_batch, stride_seq) of [B, T, V] or [N, V] logits with contiguous rows."""
        assert logits.stride(-1) == 1 or logits.size(-1) == 1
        if logits.dim() == 2:
            return 1, logits.size(0), logits.size(1), 0, logits.stride(0)
        return logits.size(0), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1)

    def token_logprob_forward(self, logits, targets, temperature=1.0, check_finite=True, logprob=None, lse=None,
                              entropy=None, with_entropy=True):
        b, s, v, sb, ss = self._logits_geometry(logits)
        rows = b * s
        dev = logits.device
        logprob = torch.empty(rows, dtype=torch.float32, device=dev) if logprob is None else logprob
        lse = torch.empty(rows, dtype=torch.float64, device=dev) if lse is None else lse
        if with_entropy and entropy is None:
            entropy = torch.empty(rows, dtype=torch.float32, device=dev)
        device, stream = self._where(logits)
        self._check(self.lib.gspo4j_token_logprob_forward(device, stream, _ptr(logits), DTYPES[logits.dtype], b, s, v, sb, ss,
                                                          _ptr(targets), temperature, int(check_finite), _ptr(logprob),
                                                          _ptr(lse), _ptr(entropy) if with_entropy else None))
        return logprob, lse, entropy if with_entropy else None

    def token_logprob_backward(self, logits, targets, lse, entropy, grad_logprob, grad_entropy=None, temperature=1.0,
                               grad_logits=None):
        b, s, v, sb, ss = self._logits_geometry(logits)
        if grad_logits is None:
            grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _, _, _, gsb, gss = self._logits_geometry(grad_logits)
        device, stream = self._where(logits)
        self._check(self.lib.gspo4j_token_logprob_backward(device, stream, _ptr(logits), DTYPES[logits.dtype], b, s, v, sb, ss,
                                                           _ptr(targets), temperature, _ptr(lse), _ptr(entropy),
                                                           _ptr(grad_logprob), _ptr(grad_entropy), _ptr(grad_logits), gsb,
                                                           gss))
        return grad_logits

    def sequence_log_ratio(self, batch, seq, tokens, offsets, logprob, old_logprob, mask, check_finite=True):
        dev = logprob.device
        log_ratio = torch.empty(batch, dtype=torch.float32, device=dev)
        lengths = torch.empty(batch, dtype=torch.float32, device=dev)
        device, stream = self._where(logprob)
        self._check(self.lib.gspo4j_sequence_log_ratio(device, stream, batch, seq, tokens, _ptr(offsets), _ptr(logprob),
                                                       _ptr(old_logprob), _ptr(mask), int(check_finite), _ptr(log_ratio),
                                                       _ptr(lengths)))
        return log_ratio, lengths

    def policy_loss(self, config, batch, seq, tokens, offsets, logprob, old_logprob, mask, advantages, per_token,
                    ref_logprob=None, entropy=None, want_grad_entropy=True, loss=None, grad_logprob=None,
                    grad_entropy=None, metrics=None):
        dev = logprob.device
        loss = torch.empty((), dtype=torch.float32, device=dev) if loss is None else loss
        grad_logprob = torch.empty(tokens, dtype=torch.float32, device=dev) if grad_logprob is None else grad_logprob
        if want_grad_entropy and grad_entropy is None:
            grad_entropy = torch.empty(tokens, dtype=torch.float32, device=dev)
        metrics = torch.empty(METRIC_COUNT, dtype=torch.float32, device=dev) if metrics is None else metrics
        device, stream = self._where(logprob)
        self._check(self.lib.gspo4j_policy_loss(device, stream, ctypes.byref(config), batch, seq, tokens, _ptr(offsets),
                                                _ptr(logprob), _ptr(old_logprob), None, _ptr(mask), _ptr(advantages),
                                                int(per_token), _ptr(ref_logprob), _ptr(entropy), None, _ptr(loss),
                                                _ptr(grad_logprob), _ptr(grad_entropy) if want_grad_entropy else None,
                                                _ptr(metrics)))
        return loss, grad_logprob, grad_entropy if want_grad_entropy else None, metrics

    def group_advantages(self, rewards, group_size, group_ids, mode, eps=1e-6, check_finite=True):
        out = torch.empty_like(rewards)
        device, stream = self._where(rewards)
        self._check(self.lib.gspo4j_group_advantages(device, stream, rewards.numel(), _ptr(rewards), group_size,
                                                     _ptr(group_ids), mode, eps, int(check_finite), _ptr(out)))
        return out

    def gae(self, batch, seq, tokens, offsets, rewards, values, mask, gamma, lam, check_finite=True):
        advantages = torch.empty_like(rewards)
        returns = torch.empty_like(rewards)
        device, stream = self._where(rewards)
        self._check(self.lib.gspo4j_gae(device, stream, batch, seq, tokens, _ptr(offsets), _ptr(rewards), _ptr(values),
                                        _ptr(mask), gamma, lam, int(check_finite), _ptr(advantages), _ptr(returns)))
        return advantages, returns
