/*
 * qwen3native.h: the whole native contract of the Qwen3Native engine.
 *
 * Conventions
 * - Every fallible call returns q3n_status. On failure q3n_last_error() returns a message for the
 *   calling thread; it stays valid until that thread's next call into the library.
 * - Handles are opaque. Each q3n_*_create / q3n_model_load has exactly one matching q3n_*_free.
 *   Free functions accept NULL. Output handles are set to NULL on failure.
 * - A sequence keeps its model alive: q3n_model_free may come before q3n_sequence_free, and the
 *   model's memory is released when its last sequence is freed.
 * - Calls on one model and its sequences are serialised inside the library (one lock per model);
 *   separate models may be used from separate threads at the same time.
 * - Options travel in versioned structs whose first field is struct_size. Fill them with the matching
 *   *_init function, passing sizeof the struct as you know it, then change what you need: the library
 *   writes and reads only the bytes that size covers, so callers built against an older header keep
 *   working with a newer library.
 * - Buffers: functions that fill a caller's array take its capacity and report the count needed;
 *   when the capacity is too small they return Q3N_ERR_BUFFER_TOO_SMALL and write nothing.
 * - No C++ exception crosses this boundary; input never aborts the host process.
 */
#ifndef QWEN3NATIVE_H
#define QWEN3NATIVE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(QWEN3NATIVE_BUILD)
#    define Q3N_API __declspec(dllexport)
#  else
#    define Q3N_API __declspec(dllimport)
#  endif
#else
#  define Q3N_API __attribute__((visibility("default")))
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define Q3N_DEPRECATED(msg) __attribute__((deprecated(msg)))
#else
#  define Q3N_DEPRECATED(msg)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change to this header. Compare with q3n_abi_version() at start-up.
 * Additions (new functions, fields appended to versioned structs, new enum values) keep the version:
 * the vision calls and q3n_model_info's vision fields arrived that way in version 1. */
#define Q3N_ABI_VERSION 1

typedef enum q3n_status {
    Q3N_OK = 0,
    Q3N_ERR_INVALID_ARGUMENT = 1,  /* a NULL handle, a value out of range, a wrong struct_size */
    Q3N_ERR_IO = 2,                /* a file is missing or cannot be read or mapped */
    Q3N_ERR_BAD_CHECKPOINT = 3,    /* a safetensors file or index breaks the format's rules */
    Q3N_ERR_BAD_CONFIG = 4,        /* config.json is missing, malformed or inconsistent */
    Q3N_ERR_UNSUPPORTED = 5,       /* valid input this build cannot run (architecture, device) */
    Q3N_ERR_OUT_OF_MEMORY = 6,
    Q3N_ERR_CONTEXT_OVERFLOW = 7,  /* a sequence would exceed the model's context length */
    Q3N_ERR_KV_CACHE_FULL = 8,     /* the KV cache has no free blocks for this step; nothing changed */
    Q3N_ERR_NUMERIC = 9,           /* NaN or Inf in the logits; no token was produced */
    Q3N_ERR_DEVICE = 10,           /* the accelerator failed; the model refuses further work */
    Q3N_ERR_BUFFER_TOO_SMALL = 11,
    Q3N_ERR_INVALID_STATE = 12,    /* e.g. sampling before any step produced logits */
    Q3N_ERR_INTERNAL = 13
} q3n_status;

typedef enum q3n_device {
    Q3N_DEVICE_AUTO = 0, /* CUDA when this build has it and a GPU is present, else CPU */
    Q3N_DEVICE_CPU = 1,
    Q3N_DEVICE_CUDA = 2
} q3n_device;

typedef enum q3n_dtype {
    Q3N_DTYPE_AUTO = 0,
    Q3N_DTYPE_F32 = 1,
    Q3N_DTYPE_BF16 = 2,
    Q3N_DTYPE_F16 = 3,
    Q3N_DTYPE_FP8_E4M3 = 4
} q3n_dtype;

typedef enum q3n_load_format {
    Q3N_LOAD_SAFETENSORS = 0, /* the checkpoint's own weights */
    Q3N_LOAD_DUMMY = 1        /* config.json only; seeded random weights of the real shapes and dtypes */
} q3n_load_format;

typedef struct q3n_model q3n_model;
typedef struct q3n_sequence q3n_sequence;

/* Called during loading with the fraction done in [0, 1]. Return non-zero to cancel the load. */
typedef int (*q3n_progress_fn)(float fraction, void* user_data);

/* ---- Library ---------------------------------------------------------------------------------- */

Q3N_API uint32_t q3n_abi_version(void);
/* A static string such as "0.1.0+cpu". */
Q3N_API const char* q3n_version_string(void);
/* The calling thread's last error message ("" when none). Valid until this thread calls again. */
Q3N_API const char* q3n_last_error(void);
/* A static name such as "Q3N_ERR_BAD_CONFIG". */
Q3N_API const char* q3n_status_name(q3n_status status);

/* ---- Model ------------------------------------------------------------------------------------ */

typedef struct q3n_model_options {
    uint32_t struct_size;      /* sizeof(q3n_model_options) */
    q3n_device device;         /* default AUTO */
    int32_t device_index;      /* default 0 */
    q3n_dtype kv_cache_dtype;  /* AUTO (= F32 on the CPU), F32 or BF16 */
    uint32_t context_length;   /* longest sequence; 0 = min(max_position_embeddings, 32768) */
    uint64_t kv_cache_tokens;  /* KV capacity shared by all sequences; 0 = context_length */
    uint32_t kv_block_size;    /* tokens per KV block; 0 = 16 */
    q3n_load_format load_format;
    uint64_t dummy_seed;       /* seed of the DUMMY load format */
    uint32_t num_threads;      /* CPU worker threads; 0 = all cores */
    q3n_progress_fn progress;  /* may be NULL */
    void* progress_user_data;
} q3n_model_options;

/* Fills the defaults into the first `struct_size` bytes (pass sizeof *options) and sets struct_size. */
Q3N_API void q3n_model_options_init(q3n_model_options* options, size_t struct_size);

/* Loads the checkpoint directory `path` (config.json plus model.safetensors or a sharded index).
 * `options` may be NULL for defaults. On success *out_model owns the model: free it with
 * q3n_model_free. Nothing in the directory is executed. */
Q3N_API q3n_status q3n_model_load(const char* path, const q3n_model_options* options, q3n_model** out_model);
Q3N_API void q3n_model_free(q3n_model* model);

typedef struct q3n_model_info {
    uint32_t struct_size;            /* set by the caller: sizeof(q3n_model_info) */
    const char* architecture;        /* e.g. "Qwen3ForCausalLM"; valid while the model lives */
    q3n_dtype weight_dtype;          /* BF16, or FP8_E4M3 for block-FP8 checkpoints */
    q3n_device device;               /* where it runs */
    q3n_dtype kv_cache_dtype;
    uint32_t vocab_size;
    uint32_t hidden_size;
    uint32_t intermediate_size;
    uint32_t num_layers;
    uint32_t num_attention_heads;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    uint32_t max_position_embeddings;
    uint32_t context_length;         /* as loaded */
    uint64_t kv_cache_tokens;
    uint32_t kv_block_size;
    int32_t bos_token_id;            /* -1 when the config has none */
    int32_t eos_token_id;            /* the first of eos_token_ids; -1 when none */
    uint32_t num_eos_token_ids;
    const int32_t* eos_token_ids;    /* config.json then generation_config.json, de-duplicated */
    uint64_t parameter_count;
    uint64_t weight_bytes;
    /* Vision (Qwen3-VL). Appended later: a caller whose struct_size ends before has_vision is not
     * written there. For a model without a vision tower has_vision is 0, the sizes 0 and the ids -1. */
    uint32_t has_vision;             /* non-zero: q3n_sequence_append_vision accepts images and videos */
    uint32_t patch_size;             /* pixels per patch side (16) */
    uint32_t temporal_patch_size;    /* frames per patch (2; a still image is its frame twice) */
    uint32_t spatial_merge_size;     /* patches per merged token side (2): grid_h and grid_w are multiples */
    int32_t image_token_id;          /* <|image_pad|>: queued by q3n_sequence_append_vision, never appended */
    int32_t video_token_id;          /* <|video_pad|>: likewise */
    int32_t vision_start_token_id;   /* <|vision_start|>: appended by the caller before each item */
    int32_t vision_end_token_id;     /* <|vision_end|>: appended by the caller after each item */
} q3n_model_info;

Q3N_API q3n_status q3n_model_get_info(const q3n_model* model, q3n_model_info* info);

/* ---- Sequences -------------------------------------------------------------------------------- */

/* A sequence is one token stream with its own KV blocks. Create many and step them together. */
Q3N_API q3n_status q3n_sequence_create(q3n_model* model, q3n_sequence** out_sequence);
/* Frees the sequence and returns its KV blocks at once. */
Q3N_API void q3n_sequence_free(q3n_sequence* sequence);

/* Queues tokens to be processed by the next q3n_model_step. Ids must be < vocab_size, and the
 * sequence may not grow past context_length (Q3N_ERR_CONTEXT_OVERFLOW; nothing is queued). */
Q3N_API q3n_status q3n_sequence_append(q3n_sequence* sequence, const int32_t* tokens, size_t count);
/* Tokens in the sequence, processed and queued. */
Q3N_API q3n_status q3n_sequence_length(const q3n_sequence* sequence, size_t* out_length);
/* Tokens whose keys and values are in the cache. */
Q3N_API q3n_status q3n_sequence_cached_length(const q3n_sequence* sequence, size_t* out_length);
/* Copies the sequence's tokens (processed and queued) into `tokens`. */
Q3N_API q3n_status q3n_sequence_get_tokens(const q3n_sequence* sequence, int32_t* tokens, size_t capacity,
                                           size_t* out_count);
/* Keeps the first `length` tokens and drops the rest with their cache (rollback, prompt edits).
 * Logits and sampled tokens of the dropped part are discarded. A `length` inside an image or video
 * item (q3n_sequence_append_vision) drops that whole item too: the sequence keeps the tokens before
 * it (read the new length with q3n_sequence_length). Rotary positions follow the kept tokens. */
Q3N_API q3n_status q3n_sequence_truncate(q3n_sequence* sequence, size_t length);

/* The rotary positions of the sequence's tokens (processed and queued): 3 * length values, the
 * temporal row, then the height row, then the width row (transformers' position_ids [3][length]).
 * Qwen3-VL models place image and video tokens on a grid (spec: get_rope_index); for every other
 * model all three rows are 0, 1, 2, ... *out_count is 3 * length. */
Q3N_API q3n_status q3n_sequence_get_rope_positions(const q3n_sequence* sequence, int32_t* positions,
                                                   size_t capacity, size_t* out_count);

/* ---- Vision input (Qwen3-VL) -------------------------------------------------------------------- */

typedef enum q3n_vision_kind {
    Q3N_VISION_IMAGE = 0,
    Q3N_VISION_VIDEO = 1
} q3n_vision_kind;

/* Queues one image or video for a model with has_vision (q3n_model_info): grid_t*grid_h*grid_w /
 * spatial_merge_size^2 placeholder tokens (image_token_id or video_token_id) are appended as input,
 * standing for the item's merged vision tokens.
 * - pixel_values are the processor's flattened patches, [grid_t*grid_h*grid_w, 3 * temporal_patch_size
 *   * patch_size^2] fp32 row-major: exactly transformers' pixel_values (or pixel_values_videos) rows
 *   of this item, with its image_grid_thw (video_grid_thw) (grid_t, grid_h, grid_w).
 *   value_count is the number of floats. They are copied: the buffer may be freed after the call.
 * - The caller appends <|vision_start|> before and <|vision_end|> after as ordinary tokens, and a
 *   video's timestamp text. A video may come as one item with grid_t > 1 (its slices' placeholders
 *   back to back) or as one item per temporal patch (grid_t = 1) with timestamps between them, as
 *   transformers' processor lays it out; either way each temporal slice is positioned as its own
 *   item, as transformers' get_rope_index does. An image has grid_t 1.
 * - The vision tower runs in the step that first reaches the item's placeholders; its output is kept
 *   until every placeholder is processed, so a chunked prefill (q3n_model_step_limited) may split an
 *   item across steps. The pixels are released once the tower has run.
 * Errors (nothing is queued): Q3N_ERR_UNSUPPORTED when the model has no vision tower;
 * Q3N_ERR_INVALID_ARGUMENT for an unknown kind, a zero grid size, grid_h or grid_w not a multiple of
 * spatial_merge_size, an image with grid_t != 1, a value_count that does not match the grid, NULL or
 * non-finite pixel values; Q3N_ERR_CONTEXT_OVERFLOW when the placeholders would pass context_length.
 * Placeholder ids passed to q3n_sequence_append instead are refused with Q3N_ERR_INVALID_ARGUMENT on
 * vision models (they would have no pixels). */
Q3N_API q3n_status q3n_sequence_append_vision(q3n_sequence* sequence, q3n_vision_kind kind, uint32_t grid_t,
                                              uint32_t grid_h, uint32_t grid_w, const float* pixel_values,
                                              size_t value_count);

/* ---- Stepping --------------------------------------------------------------------------------- */

enum {
    /* After the forward pass each stepped sequence samples its next token with its sampling
     * parameters, appends it as queued input, and q3n_sequence_last_token returns it. */
    Q3N_STEP_SAMPLE = 1u << 0
};

/* One forward pass over the queued tokens of every listed sequence (prompts and single decode
 * tokens mixed freely). Each listed sequence must have at least one queued token; a sequence may
 * appear once. Afterwards each has the logits of its last position. On Q3N_ERR_KV_CACHE_FULL
 * nothing changed; on Q3N_ERR_NUMERIC the cache was filled but no token was sampled. */
Q3N_API q3n_status q3n_model_step(q3n_model* model, q3n_sequence* const* sequences, size_t count, uint32_t flags);

/* As q3n_model_step, but each listed sequence processes at most `max_tokens` of its queued tokens
 * (0: all of them); the rest stay queued for later steps (chunked prefill). Afterwards each has the
 * logits of its last processed position; while tokens remain queued they can be read but not
 * sampled (Q3N_ERR_INVALID_STATE), and Q3N_STEP_SAMPLE is refused (Q3N_ERR_INVALID_ARGUMENT) for a
 * step that leaves any listed sequence with queued tokens. */
Q3N_API q3n_status q3n_model_step_limited(q3n_model* model, q3n_sequence* const* sequences, size_t count,
                                          uint32_t flags, size_t max_tokens);

/* The last step's logits at the sequence's last position (vocab_size floats, fp32). */
Q3N_API q3n_status q3n_sequence_get_logits(const q3n_sequence* sequence, float* logits, size_t capacity,
                                           size_t* out_count);

/* ---- Sampling --------------------------------------------------------------------------------- */

#define Q3N_MAX_TOP_LOGPROBS 20

typedef struct q3n_sampling_params {
    uint32_t struct_size;          /* sizeof(q3n_sampling_params) */
    float temperature;             /* <= 0: greedy (argmax), then top_k/top_p/min_p are ignored */
    int32_t top_k;                 /* <= 0: off */
    float top_p;                   /* (0, 1]; 1: off */
    float min_p;                   /* [0, 1]; 0: off */
    float repetition_penalty;      /* > 0 and finite; 1: off. On every token of the sequence (HF rule) */
    float presence_penalty;        /* 0: off. On output tokens (OpenAI/vLLM rule) */
    float frequency_penalty;       /* 0: off. On output tokens */
    /* Output tokens are those sampled since the last q3n_sequence_set_sampling: one request's. */
    uint64_t seed;                 /* the same seed, logits and parameters give the same tokens */
    uint32_t logprobs;             /* non-zero: each sampled token's log-probability is computed */
    uint32_t top_logprobs;         /* 0..Q3N_MAX_TOP_LOGPROBS alternatives reported with it */
    uint32_t prompt_logprobs;      /* non-zero: log-probabilities of the tokens prefilled by later steps */
    uint32_t vocab_limit;          /* ids >= this are never sampled (embedding rows past the tokenizer's
                                      151,669 ids are padding); 0: none excluded */
} q3n_sampling_params;

/* Greedy: temperature 0, every filter and penalty off, seed 0, no log-probabilities. Writes only the
 * first `struct_size` bytes (pass sizeof *params) and sets struct_size. */
Q3N_API void q3n_sampling_params_init(q3n_sampling_params* params, size_t struct_size);
/* Sets the sequence's sampler (copied) and restarts its random stream from params->seed. */
Q3N_API q3n_status q3n_sequence_set_sampling(q3n_sequence* sequence, const q3n_sampling_params* params);
/* Samples from the last step's logits, appends the token as queued input and returns it.
 * Q3N_ERR_INVALID_STATE when there are no fresh logits (no step since the last sample). */
Q3N_API q3n_status q3n_sequence_sample(q3n_sequence* sequence, int32_t* out_token);
/* The token the last Q3N_STEP_SAMPLE step or q3n_sequence_sample produced; -1 when none. */
Q3N_API q3n_status q3n_sequence_last_token(const q3n_sequence* sequence, int32_t* out_token);

/* ---- Log-probabilities and statistics ---------------------------------------------------------- */

/* A token's log-probability under the model: log-softmax of the raw fp32 logits (before penalties
 * and temperature), with the most likely alternatives, sorted by log-probability (ties: lower id). */
typedef struct q3n_token_logprob {
    int32_t token;
    float logprob;
    uint32_t num_top;                               /* entries filled below */
    int32_t top_tokens[Q3N_MAX_TOP_LOGPROBS];
    float top_logprobs[Q3N_MAX_TOP_LOGPROBS];
} q3n_token_logprob;

/* The last sampled token's log-probability (sampling params with logprobs set).
 * Q3N_ERR_INVALID_STATE when none was computed. */
Q3N_API q3n_status q3n_sequence_get_token_logprob(const q3n_sequence* sequence, q3n_token_logprob* out);

/* Log-probabilities of the tokens prefilled since the request began (prompt_logprobs set), one per
 * token that had a predecessor in this request's steps, in order. The first token of a sequence has
 * none. With a reused prefix, only the newly prefilled tokens are reported. */
Q3N_API q3n_status q3n_sequence_get_prompt_logprobs(const q3n_sequence* sequence, q3n_token_logprob* out,
                                                    size_t capacity, size_t* out_count);

/* One request's figures; a request starts at q3n_sequence_set_sampling (or at creation). */
typedef struct q3n_sequence_stats {
    uint32_t struct_size;            /* set by the caller: sizeof(q3n_sequence_stats) */
    uint64_t prompt_tokens;          /* tokens appended and processed by steps, not sampled */
    uint64_t cached_tokens;          /* tokens already in the cache when the request began (reused) */
    uint64_t generated_tokens;       /* tokens sampled */
    double time_to_first_token_ms;   /* first step of the request to the first sample; 0 before it */
    double decode_tokens_per_s;      /* (generated - 1) / time from the first to the last sample */
    double prefill_ms;               /* time spent in steps before the first sample */
} q3n_sequence_stats;

Q3N_API q3n_status q3n_sequence_get_stats(const q3n_sequence* sequence, q3n_sequence_stats* stats);

/* ---- Images ----------------------------------------------------------------------------------- */

/* Still images for the vision models, decoded by libjpeg-turbo, libpng and libwebp into 8-bit RGB.
 * The format is recognised from the leading bytes, never from a file name. Errors:
 * Q3N_ERR_UNSUPPORTED for other formats (GIF, BMP, TIFF...) and animated WebP;
 * Q3N_ERR_INVALID_ARGUMENT for empty, corrupt or truncated data and for an image over the pixel
 * limit (decided from the header, before the pixels are allocated or decoded). */

typedef enum q3n_image_format {
    Q3N_IMAGE_FORMAT_UNKNOWN = 0,
    Q3N_IMAGE_FORMAT_JPEG = 1,
    Q3N_IMAGE_FORMAT_PNG = 2,
    Q3N_IMAGE_FORMAT_WEBP = 3
} q3n_image_format;

/* The default pixel limit: twice PIL's MAX_IMAGE_PIXELS, where PIL refuses a decompression bomb. */
#define Q3N_IMAGE_DEFAULT_MAX_PIXELS 178956970

typedef struct q3n_image_decode_options {
    uint32_t struct_size;            /* sizeof(q3n_image_decode_options) */
    uint64_t max_pixels;             /* width * height above this is refused; default
                                        Q3N_IMAGE_DEFAULT_MAX_PIXELS; must be at least 1 */
    uint32_t apply_exif_orientation; /* non-zero (default): turn JPEG and PNG (eXIf) images upright as
                                        their EXIF Orientation says, as PIL.ImageOps.exif_transpose */
} q3n_image_decode_options;

/* Fills the defaults into the first `struct_size` bytes (pass sizeof *options) and sets struct_size. */
Q3N_API void q3n_image_decode_options_init(q3n_image_decode_options* options, size_t struct_size);

typedef struct q3n_image_info {
    uint32_t struct_size;            /* set by the caller: sizeof(q3n_image_info) */
    q3n_image_format format;
    uint32_t width;                  /* of the RGB pixels: upright when the orientation is applied */
    uint32_t height;
    uint32_t stored_width;           /* as the file stores the image, before any orientation */
    uint32_t stored_height;
    uint32_t exif_orientation;       /* 1..8 as in the file; 1 when absent or invalid */
    uint32_t source_channels;        /* 1 gray, 2 gray+alpha, 3 colour, 4 colour+alpha or CMYK */
    uint32_t source_bit_depth;       /* bits per sample in the file: 1, 2, 4, 8 or 16 */
} q3n_image_info;

typedef struct q3n_image q3n_image;

/* Reads only the header of an encoded image (no pixel is decoded or allocated; no pixel limit):
 * format, stored size, orientation, and the size q3n_image_decode gives with the default options.
 * `bytes` is only read during the call. */
Q3N_API q3n_status q3n_image_probe(const uint8_t* bytes, size_t size, q3n_image_info* info);

/* Decodes an encoded image into RGB8. `options` may be NULL for defaults. `bytes` is only read
 * during the call. On success *out_image owns the pixels: free it with q3n_image_free. Alpha is
 * dropped without compositing, 16-bit samples keep their high byte and CMYK JPEGs are converted,
 * all as PIL's Image.convert("RGB"). */
Q3N_API q3n_status q3n_image_decode(const uint8_t* bytes, size_t size, const q3n_image_decode_options* options,
                                    q3n_image** out_image);
Q3N_API void q3n_image_free(q3n_image* image);

/* The decoded image's info; width and height are those of the pixels. */
Q3N_API q3n_status q3n_image_get_info(const q3n_image* image, q3n_image_info* info);

/* Copies the pixels (interleaved R, G, B bytes, row-major, width * 3 bytes per row, no padding) into
 * `pixels`; *out_count is width * height * 3. */
Q3N_API q3n_status q3n_image_get_pixels(const q3n_image* image, uint8_t* pixels, size_t capacity,
                                        size_t* out_count);

#ifdef __cplusplus
}
#endif

#endif /* QWEN3NATIVE_H */
