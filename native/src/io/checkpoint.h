// A checkpoint directory: model.safetensors, or model.safetensors.index.json with its shards.
// Every shard is validated; the index must name existing shards and tensors that are really in them,
// and a tensor may appear in one file only.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace q3n {

class Checkpoint {
public:
    // Throws q3n::Error: Q3N_ERR_IO when the directory has neither file, Q3N_ERR_BAD_CHECKPOINT for a
    // bad index or shard (the message names the file and the tensor).
    static std::unique_ptr<Checkpoint> open(const std::string& directory);

    bool has(const std::string& name) const { return tensors_.count(name) != 0; }
    // Throws Q3N_ERR_BAD_CHECKPOINT "missing tensor <name>" when absent.
    const TensorView& get(const std::string& name) const;
    const TensorView* find(const std::string& name) const;
    const std::map<std::string, TensorView>& tensors() const { return tensors_; }
    const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

private:
    std::vector<std::shared_ptr<SafetensorsFile>> files_;
    std::map<std::string, TensorView> tensors_;
};

}  // namespace q3n
