package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.Random;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/** The host passes compute() makes on CPU tensors, against the same answers from libtorch ops. */
class HostScanTest {

    private static Tensor bytesLike(Tensor t) {
        return Tensors.empty(Tensors.shape(t), ScalarType.Bool, t);
    }

    @Test
    void masksOfEveryReadDtypeConvertToTheirBoolValues() {
        final Random random = new Random(5);
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.Double, ScalarType.Long, ScalarType.Int,
                ScalarType.Byte}) {
            assertTrue(HostScan.readsMask(type), type.toString());
            for (int n : new int[] {0, 1, 7, 64, 1001}) {
                try (Tensor bits = torch.randint(2, new long[] {n}, new TensorOptions(ScalarType.Long));
                        Tensor mask = bits.to(type); Tensor out = bytesLike(mask); Tensor expected = mask.to(ScalarType.Bool)) {
                    assertEquals(-1, HostScan.maskToBytes(mask, out), type + " n=" + n);
                    assertTrue(n == 0 || out.equal(expected), type + " n=" + n);
                }
            }
            random.nextInt();
        }
        assertEquals(false, HostScan.readsMask(ScalarType.Half));
        assertEquals(false, HostScan.readsMask(ScalarType.Bool));
    }

    @Test
    void theFirstValueOtherThanZeroOrOneIsFound() {
        // float32: NaN, 2, -1, 0.5 and +-Inf are other values; -0.0 is 0.
        for (float bad : new float[] {Float.NaN, 2f, -1f, 0.5f, Float.POSITIVE_INFINITY, Float.NEGATIVE_INFINITY, 1e-45f}) {
            try (Tensor mask = torch.ones(9); Tensor out = bytesLike(mask)) {
                try (Tensor at = mask.narrow(0, 6, 1); Scalar v = new Scalar(bad)) {
                    at.fill_(v);
                }
                assertEquals(6, HostScan.maskToBytes(mask, out), "value " + bad);
            }
        }
        try (Tensor mask = torch.zeros(3); Tensor out = bytesLike(mask); Scalar minusZero = new Scalar(-0.0)) {
            mask.fill_(minusZero);
            assertEquals(-1, HostScan.maskToBytes(mask, out));
            try (Tensor expected = torch.zeros(new long[] {3}, new TensorOptions(ScalarType.Bool))) {
                assertTrue(out.equal(expected));
            }
        }
        // Integers: 2, -1 and (uint8) 255 are other values.
        for (ScalarType type : new ScalarType[] {ScalarType.Long, ScalarType.Int, ScalarType.Byte}) {
            for (long bad : type == ScalarType.Byte ? new long[] {2, 255} : new long[] {2, -1, 256}) {
                try (Tensor ones = torch.ones(5); Tensor mask = ones.to(type); Tensor out = bytesLike(mask)) {
                    try (Tensor at = mask.narrow(0, 3, 1); Scalar v = new Scalar(bad)) {
                        at.fill_(v);
                    }
                    assertEquals(3, HostScan.maskToBytes(mask, out), type + " value " + bad);
                }
            }
        }
        try (Tensor ones = torch.ones(4); Tensor mask = ones.to(ScalarType.Double); Tensor out = bytesLike(mask);
                Tensor at = mask.narrow(0, 0, 1);
                Scalar v = new Scalar(Double.NaN)) {
            at.fill_(v);
            assertEquals(0, HostScan.maskToBytes(mask, out));
        }
    }

    @Test
    void idsOutsideTheVocabularyAreFoundFirstToLast() {
        try (Tensor ids = torch.randint(10, new long[] {50}, new TensorOptions(ScalarType.Long))) {
            assertEquals(-1, HostScan.firstOutside(ids, 10));
            try (Tensor at = ids.narrow(0, 40, 1); Scalar v = new Scalar(10L)) {
                at.fill_(v);
            }
            assertEquals(40, HostScan.firstOutside(ids, 10));
            try (Tensor at = ids.narrow(0, 12, 1); Scalar v = new Scalar(-1L)) {
                at.fill_(v);
            }
            assertEquals(12, HostScan.firstOutside(ids, 10));
            assertEquals(12, HostScan.firstOutside(ids, Long.MAX_VALUE), "-1 is outside [0, MAX)");
        }
    }

    @Test
    void countsMatchLibtorchInBothLayouts() {
        final Random random = new Random(11);
        for (int trial = 0; trial < 20; trial++) {
            final int batch = 1 + random.nextInt(6);
            final int seq = 1 + random.nextInt(9);
            try (Tensor bits = torch.randint(2, new long[] {batch, seq}, new TensorOptions(ScalarType.Long));
                    Tensor mask = bits.to(ScalarType.Bool)) {
                if (trial % 3 == 0) {
                    try (Tensor row = mask.narrow(0, 0, 1)) {
                        row.zero_(); // a response with no counted token
                    }
                }
                final long[] counts = HostScan.counts(mask, TokenLayout.padded(batch, seq));
                try (Tensor any = mask.any(1); Tensor responses = any.sum(); Tensor tokens = mask.sum()) {
                    assertArrayEquals(new long[] {responses.item_long(), tokens.item_long()}, counts);
                }
                // Packed: the same bits as one [N] tensor with offsets of random lengths.
                final long[] offsets = new long[batch + 1];
                for (int b = 0; b < batch; b++) {
                    offsets[b + 1] = offsets[b] + random.nextInt(seq + 1);
                }
                final long n = offsets[batch];
                try (Tensor flat = mask.view(-1); Tensor packed = flat.narrow(0, 0, n).contiguous();
                        org.bytedeco.javacpp.LongPointer o = new org.bytedeco.javacpp.LongPointer(offsets)) {
                    final long[] got = HostScan.counts(packed, TokenLayout.packed(o, batch, n));
                    long responses = 0;
                    long tokens = 0;
                    long nonEmpty = 0;
                    for (int b = 0; b < batch; b++) {
                        long here = 0;
                        for (long i = offsets[b]; i < offsets[b + 1]; i++) {
                            here += Tensors.bytes(packed).get(i) != 0 ? 1 : 0;
                        }
                        tokens += here;
                        responses += here > 0 ? 1 : 0;
                        nonEmpty += offsets[b + 1] > offsets[b] ? 1 : 0;
                    }
                    assertArrayEquals(new long[] {responses, tokens}, got);
                    assertEquals(nonEmpty, HostScan.nonEmpty(TokenLayout.packed(o, batch, n)));
                }
            }
        }
    }
}
