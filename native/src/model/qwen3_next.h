// Qwen3-Next (architecture Qwen3NextForCausalLM, shared/spec 3) on the CPU backend: a hybrid of
// Gated DeltaNet layers (recurrent, per-sequence conv and delta-rule states kept by the runner)
// and gated full-attention layers (paged KV cache), every layer followed by a routed MoE block
// with a sigmoid-gated shared expert. All RMSNorms but the GDN output norm are zero-centred.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "core/thread_pool.h"
#include "kv/kv_cache.h"
#include "model/model_runner.h"
#include "model/qwen3_next_layout.h"
#include "model/weight_loader.h"

namespace q3n {

// Gated attention (spec 3.3): q_proj is [nH * 2d, H] with query and gate interleaved per head.
struct NextAttentionWeights {
    std::vector<float> q_norm, k_norm;  // [d], stored as offsets from 1
    Linear q, k, v, o;
};

// Gated DeltaNet (spec 3.4), tensors as stored (the projections keep the per-group interleave;
// the runner de-interleaves activations, so FP8 scale blocks never move).
struct NextGdnWeights {
    Linear qkvz;                 // [2 key_dim + 2 value_dim, H]
    Linear ba;                   // [2 nv, H]; BF16 in the FP8 releases
    std::vector<float> conv;     // [conv_dim, K] (the checkpoint's [conv_dim, 1, K])
    std::vector<float> A_log;    // [nv]
    std::vector<float> dt_bias;  // [nv]
    std::vector<float> norm;     // [dv], plain w * x form
    Linear out;                  // [H, value_dim]
};

// The MLP of one layer: routed experts plus a shared expert scaled by sigmoid(x . shared_gate),
// or (only on mlp_only_layers, which no released config has) a dense SwiGLU.
struct NextMlpWeights {
    bool sparse = true;
    Linear router;                        // [E, H]
    std::vector<cpu::MoeExpert> experts;  // E views
    cpu::MoeExpert shared;                // [I_s, H], [I_s, H], [H, I_s]
    Linear shared_gate;                   // [1, H]
    cpu::MoeExpert dense;                 // sparse == false: intermediate_size SwiGLU
};

struct NextLayerWeights {
    NextLayerKind kind = NextLayerKind::LinearAttention;
    std::vector<float> input_norm, post_attn_norm;  // [H], offsets from 1
    NextAttentionWeights attn;                      // full-attention layers
    NextGdnWeights gdn;                             // linear-attention layers
    NextMlpWeights mlp;
};

// Multi-token prediction module (spec 3.7). Loaded so checkpoints that carry it load and keep it;
// nothing runs it yet. Each piece is filled only when the checkpoint has it (shape-checked then).
struct NextMtpLayerWeights {
    bool present = false;
    NextLayerWeights layer;  // a full-attention layer; tensors absent from the checkpoint stay empty
};

struct NextMtpWeights {
    std::vector<float> pre_fc_norm_embedding, pre_fc_norm_hidden, norm;  // [H]
    Linear fc;                                                           // [H, 2H]
    std::vector<NextMtpLayerWeights> layers;
    size_t tensors = 0;  // how many mtp.* tensors were loaded
};

struct Qwen3NextWeights {
    Linear embed;
    Linear lm_head;
    std::vector<float> final_norm;
    std::vector<NextLayerWeights> layers;
    NextMtpWeights mtp;
};

Qwen3NextWeights load_qwen3_next_weights(const ModelConfig& config, WeightSource& source,
                                         const std::function<bool(float)>& progress);

// KV slots the runner uses: one per full-attention layer (slot = number of full-attention layers
// before it). The engine may size its cache with this instead of num_hidden_layers.
size_t qwen3_next_kv_layers(const ModelConfig& config);

class Qwen3NextRunner : public ModelRunner {
public:
    // Sequences whose recurrent state the runner holds now (tests check that freeing drops them).
    virtual size_t live_sequences() const = 0;
    // Bytes of recurrent state per sequence (conv + delta-rule, fp32, all GDN layers).
    virtual size_t state_bytes_per_sequence() const = 0;
};

std::unique_ptr<Qwen3NextRunner> make_qwen3_next_cpu(const ModelConfig& config, Qwen3NextWeights weights, KvCache& kv,
                                                     ThreadPool& pool);

}  // namespace q3n
