#include <cstdio>
#include <vector>
#include "gspo4j/gspo4j.h"
#include "simt.h"
#include <cuda_runtime.h>
int main() {
    const int64_t V = 1000, B = 2, T = 3;
    std::vector<float> logits(B * T * V);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = (float)((i * 2654435761u) % 1000) / 100.0f;
    std::vector<int64_t> targets = {1, 2, 3, 4, 5, 999};
    std::vector<float> lp(6), ent(6); std::vector<double> lse(6);
    gspo4j_token_logprob_forward(0, nullptr, logits.data(), 0, B, T, V, T * V, V, targets.data(), 1.0, 1, lp.data(), lse.data(), ent.data());
    void *dl, *dt, *dlp, *dlse, *dent;
    cudaMalloc(&dl, logits.size() * 4); cudaMalloc(&dt, 48); cudaMalloc(&dlp, 24); cudaMalloc(&dlse, 48); cudaMalloc(&dent, 24);
    cudaMemcpy(dl, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dt, targets.data(), 48, cudaMemcpyHostToDevice);
    int s = gspo4j_token_logprob_forward(1, nullptr, dl, 0, B, T, V, T * V, V, (int64_t*)dt, 1.0, 1, (float*)dlp, (double*)dlse, (float*)dent);
    printf("status %d %s\n", s, gspo4j_last_error());
    s = gspo4j_cuda_check_error(nullptr);
    printf("check %d %s\n", s, gspo4j_last_error());
    for (int i = 0; i < 6; ++i) printf("%d cpu %.9g %.17g %.9g cuda %.9g %.17g %.9g\n", i, lp[i], lse[i], ent[i], ((float*)dlp)[i], ((double*)dlse)[i], ((float*)dent)[i]);
    for (auto& m : simt::take_misuses()) printf("misuse: %s\n", m.c_str());
    auto c = simt::counters(); printf("launches %lu blocks %lu threads %lu switches %lu\n", c.launches, c.blocks, c.threads, c.switches);
}
