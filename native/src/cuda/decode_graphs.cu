#include "cuda/decode_graphs.h"

#include <algorithm>
#include <bit>

#include "cuda/cuda_check.h"

namespace q3n::cuda {

void DecodeGraphs::run(uint64_t key, cudaStream_t stream, const std::function<void()>& enqueue) {
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
        cudaGraph_t graph = nullptr;
        Q3N_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        try {
            enqueue();
        } catch (...) {
            cudaStreamEndCapture(stream, &graph);
            if (graph) cudaGraphDestroy(graph);
            throw;
        }
        Q3N_CUDA(cudaStreamEndCapture(stream, &graph));
        cudaGraphExec_t exec = nullptr;
        const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
        cudaGraphDestroy(graph);
        Q3N_CUDA(e);
        it = graphs_.emplace(key, exec).first;
    }
    Q3N_CUDA(cudaGraphLaunch(it->second, stream));
}

void DecodeGraphs::clear() {
    for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
    graphs_.clear();
}

bool StepInputs::upload(const StepBatch& b, int block_size, bool decode_only, cudaStream_t stream) {
    const int T = static_cast<int>(b.tokens.size());
    prefill_ = false;
    for (const SequenceSpan& span : b.sequences) prefill_ = prefill_ || span.count > 1;
    seq_ids_.clear();
    seq_of_token_.resize(T);
    blocks_needed_.clear();
    tables_.clear();
    for (int t = 0; t < T; ++t) {
        auto [it, fresh] = seq_ids_.emplace(b.slots[t].block_table, static_cast<int>(tables_.size()));
        if (fresh) {
            tables_.push_back(b.slots[t].block_table);
            blocks_needed_.push_back(0);
        }
        seq_of_token_[t] = it->second;
        blocks_needed_[it->second] = std::max(blocks_needed_[it->second], b.slots[t].position / block_size + 1);
    }
    int max_blocks = blocks_needed_.empty() ? 1 : *std::max_element(blocks_needed_.begin(), blocks_needed_.end());
    if (decode_only) max_blocks = static_cast<int>(std::bit_ceil(static_cast<unsigned>(max_blocks)));
    host_tables_.assign(tables_.size() * max_blocks, 0);
    for (size_t s = 0; s < tables_.size(); ++s)
        std::copy_n(tables_[s], blocks_needed_[s], host_tables_.begin() + s * max_blocks);

    bool moved = false;
    auto grow = [&](DeviceBuffer& buf, size_t bytes) {
        if (bytes > buf.bytes()) {
            buf.resize(std::max(bytes, buf.bytes() * 2));
            moved = true;
        }
    };
    const size_t rows = static_cast<size_t>(std::max(T, kMaxGraphTokens));
    grow(tokens_dev_, rows * 4);
    grow(positions_, rows * 4);
    grow(seq_, rows * 4);
    grow(tables_dev_, std::max<size_t>(host_tables_.size(), 1) * 4);
    // Pageable sources: each copy is staged before the call returns, so the host vectors may change after.
    if (T > 0) {
        Q3N_CUDA(cudaMemcpyAsync(tokens_dev_.get(), b.tokens.data(), T * 4, cudaMemcpyHostToDevice, stream));
        Q3N_CUDA(cudaMemcpyAsync(positions_.get(), b.positions.data(), T * 4, cudaMemcpyHostToDevice, stream));
        Q3N_CUDA(cudaMemcpyAsync(seq_.get(), seq_of_token_.data(), T * 4, cudaMemcpyHostToDevice, stream));
        Q3N_CUDA(cudaMemcpyAsync(tables_dev_.get(), host_tables_.data(), host_tables_.size() * 4, cudaMemcpyHostToDevice,
                                 stream));
    }
    tokens_ = T;
    max_blocks_ = max_blocks;
    return moved;
}

}  // namespace q3n::cuda
