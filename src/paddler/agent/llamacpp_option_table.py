"""Every llama-server option the embedded llama.cpp server can take, as data.

One ``Option`` per llama-server option (llama.cpp's ``common/arg.cpp``, ``llama-server --help``):
all its spellings, the ``xllamacpp.CommonParams`` field it sets (a dotted path such as
``sampling.temp``) and the ``Kind`` of value it takes.

- A switch (no kind) takes no value: its spellings set ``on``, its negations set ``off``.
- An option whose target is ``""`` has values that are ``Assign`` tuples: the few options that
  set several fields at once (``--reranking``, ``--reasoning``).
- ``extra`` is assigned too, whenever the option is given.

``REFUSED`` maps the spellings that must not reach llama.cpp to the reason the operator is told:
the agent sets the field itself, or the option cannot work in an embedded server.

Nothing here imports xllamacpp: enum members are named (``EnumRef``) and looked up when applied.
"""

from __future__ import annotations

from collections.abc import Mapping

from paddler.agent.llamacpp_option_kinds import (
    CPUS,
    INT32,
    MOE_EXPERTS,
    UINT32_MAX,
    Assign,
    Directory,
    EnumRef,
    FileText,
    Kind,
    Lora,
    Option,
    Write,
    bounded_int,
    choice,
    cpu_mask,
    cpu_range,
    csv_items,
    grammar_kind,
    ignored,
    integer,
    json_text,
    marked,
    mib_sizes,
    moe_layers,
    named,
    number,
    option,
    penalty_last_n,
    reciprocal,
    scaled_loras,
    sleep_seconds,
    split_list,
    switch,
    template_kwargs,
    thread_count,
)

INT, NATURAL, FLOAT = integer(), integer(0), number()
TEXT = Kind(str, "a value", "text")
FILE = Kind(FileText, "a file path", "file.txt")
DIRECTORY = Kind(Directory, "a directory", ".")
DEVICES = Kind(str, "a comma-separated list of devices, or none", "none")
OVERRIDES = Kind(str, "PATTERN=BUFFER_TYPE items, comma-separated", "blk\\.0\\..*=CPU")
THREADS = Kind(thread_count, "an integer", "2")
GPU_LAYERS = integer(words={"auto": -1, "all": -2})
SEED = Kind(
    lambda text: UINT32_MAX if text == "-1" else bounded_int(text, 0, UINT32_MAX),
    f"an integer from -1 to {UINT32_MAX}",
    "42",
)
CPU_MASK = Kind(cpu_mask, "a hexadecimal CPU mask of at most 128 digits", "0xF")
CPU_RANGE = Kind(cpu_range, f"a CPU range lo-hi below {CPUS}", "0-3")
STRICT = Kind(lambda text: bounded_int(text, 0, UINT32_MAX) != 0, "0 or 1", "1")
POLL = integer(0, UINT32_MAX)
PRIORITY = named(
    "ggml_sched_priority",
    "GGML_SCHED_PRIO_",
    {"0": "NORMAL", "1": "MEDIUM", "2": "HIGH", "3": "REALTIME"},
)
PRIORITY_OR_LOW = named(
    "ggml_sched_priority",
    "GGML_SCHED_PRIO_",
    {"-1": "LOW", "0": "NORMAL", "1": "MEDIUM", "2": "HIGH", "3": "REALTIME"},
)
CACHE_TYPE = named(
    "ggml_type",
    "GGML_TYPE_",
    ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"),
)
FLOATS = Kind(
    lambda text: tuple(float(part) for part in split_list(text)), "comma-separated numbers", "3,1"
)
MIB = Kind(mib_sizes, "comma-separated sizes in MiB", "1024")
CSV = Kind(csv_items, "a comma-separated list", "a,b")
ITEM = Kind(lambda text: (text,), "a value", "text")
TAGS = Kind(
    lambda text: tuple(tag.strip() for tag in text.split(",") if tag.strip()),
    "a comma-separated list",
    "a,b",
)
LORAS = Kind(
    lambda text: tuple(Lora(path) for path in csv_items(text)),
    "comma-separated file paths",
    "adapter.gguf",
)
SCALED_LORAS = Kind(scaled_loras, "FNAME:SCALE items, comma-separated", "adapter.gguf:0.5")
JSON = Kind(json_text, "JSON", "{}")
JSON_OBJECT = Kind(template_kwargs, "a JSON object", '{"key": "value"}')
MOE_LAYERS = Kind(moe_layers, "an integer from 0", "2")
NGRAM = integer(1, 1024)
SPEC_TYPE = named(
    "common_speculative_type",
    "COMMON_SPECULATIVE_TYPE_",
    (
        "none",
        "draft-simple",
        "draft-eagle3",
        "draft-mtp",
        "draft-dflash",
        "draft-dspark",
        "ngram-simple",
        "ngram-map-k",
        "ngram-map-k4v",
        "ngram-mod",
        "ngram-cache",
    ),
)
SPEC_TYPES = Kind(
    lambda text: tuple(SPEC_TYPE.parse(name) for name in text.split(",")),
    "a comma-separated list of " + SPEC_TYPE.expects.removeprefix("one of "),
    "ngram-mod",
)
TEMPERATURE = Kind(lambda text: max(float(text), 0.0), "a number", "0.7")
RECIPROCAL = Kind(reciprocal, "a number above 0", "2")
SLEEP = Kind(sleep_seconds, "-1 or a number of seconds above 0", "300")
PENALTY_LAST_N = Kind(penalty_last_n, "an integer from -1", "64")
DEPRECATED = Kind(ignored, "a value", "0.1")
FLASH_ATTN = switch(
    *(
        EnumRef("llama_flash_attn_type", f"LLAMA_FLASH_ATTN_TYPE_{m}")
        for m in ("ENABLED", "DISABLED", "AUTO")
    )
)
REASONING = switch(
    (
        Assign("enable_reasoning", 1),
        Assign("default_template_kwargs", {"enable_thinking": "true"}, Write.MERGE),
    ),
    (
        Assign("enable_reasoning", 0),
        Assign("default_template_kwargs", {"enable_thinking": "false"}, Write.MERGE),
    ),
    (Assign("enable_reasoning", -1),),
)
POOLING = named(
    "llama_pooling_type", "LLAMA_POOLING_TYPE_", ("none", "mean", "cls", "last", "rank")
)
ROPE_SCALING = named(
    "llama_rope_scaling_type", "LLAMA_ROPE_SCALING_TYPE_", ("none", "linear", "yarn")
)
SPLIT_MODE = named("llama_split_mode", "LLAMA_SPLIT_MODE_", ("none", "layer", "row", "tensor"))
LOAD_MODE = named(
    "llama_load_mode",
    "LLAMA_LOAD_MODE_",
    {
        "auto": "AUTO",
        "none": "NONE",
        "mmap": "MMAP",
        "mlock": "MLOCK",
        "mmap+mlock": "MMAP_MLOCK",
        "dio": "DIRECT_IO",
    },
)
LAZY_MODE = named("llama_lazy_mode", "LLAMA_LAZY_MODE_", ("on", "auto", "off"))
NUMA = named("ggml_numa_strategy", "GGML_NUMA_STRATEGY_", ("distribute", "isolate", "numactl"))
REASONING_FORMAT = named(
    "common_reasoning_format",
    "COMMON_REASONING_FORMAT_",
    ("none", "auto", "deepseek", "deepseek-legacy"),
)
# fmt: on


def _cpu(
    at: str, priority: Kind, mask: str, cpu_range: str, strict: str, prio: str, poll: str
) -> tuple[Option, ...]:
    """The five options of one set of CPU parameters (``cpuparams``, ``cpuparams_batch``, ...)."""
    valid = (Assign(f"{at}.mask_valid", True),)
    return (
        option(mask, f"{at}.cpumask", CPU_MASK, write=Write.OR, extra=valid),
        option(cpu_range, f"{at}.cpumask", CPU_RANGE, write=Write.OR, extra=valid),
        option(strict, f"{at}.strict_cpu", STRICT),
        option(prio, f"{at}.priority", priority),
        option(poll, f"{at}.poll", POLL),
    )


def _sampling(names: str, field: str, kind: Kind, mark: str | None = None) -> Option:
    return option(names, f"sampling.{field}", kind, extra=marked(mark) if mark else ())


_NO = {"on": False, "off": True}  # for the options that set a "no_..." field
_DRAFT = "speculative.draft"
_RANK = EnumRef("llama_pooling_type", "LLAMA_POOLING_TYPE_RANK")

# fmt: off
OPTIONS: tuple[Option, ...] = (
    # -- common ---------------------------------------------------------------------------------
    option("-tb --threads-batch", "cpuparams_batch.n_threads", THREADS),
    *_cpu("cpuparams", PRIORITY_OR_LOW, "-C --cpu-mask", "-Cr --cpu-range", "--cpu-strict", "--prio", "--poll"),
    *_cpu("cpuparams_batch", PRIORITY, "-Cb --cpu-mask-batch", "-Crb --cpu-range-batch", "--cpu-strict-batch",
          "--prio-batch", "--poll-batch"),
    option("-n --predict --n-predict", "n_predict", INT),
    option("-b --batch-size", "n_batch", INT),
    option("-ub --ubatch-size", "n_ubatch", INT),
    option("--keep", "n_keep", INT),
    option("--swa-full", "swa_full"),
    option("-fa --flash-attn", "flash_attn_type", FLASH_ATTN),
    option("--perf", ("no_perf", "sampling.no_perf"), negations="--no-perf", **_NO),
    option("-e --escape", "escape", negations="--no-escape"),
    option("--rope-scaling", "rope_scaling_type", ROPE_SCALING),
    option("--rope-scale", "rope_freq_scale", RECIPROCAL),
    option("--rope-freq-base", "rope_freq_base", FLOAT),
    option("--rope-freq-scale", "rope_freq_scale", FLOAT),
    option("--yarn-orig-ctx", "yarn_orig_ctx", INT),
    option("--yarn-ext-factor", "yarn_ext_factor", FLOAT),
    option("--yarn-attn-factor", "yarn_attn_factor", FLOAT),
    option("--yarn-beta-slow", "yarn_beta_slow", FLOAT),
    option("--yarn-beta-fast", "yarn_beta_fast", FLOAT),
    option("-kvo --kv-offload", "no_kv_offload", negations="-nkvo --no-kv-offload", **_NO),
    option("--repack", "no_extra_bufts", negations="-nr --no-repack", **_NO),
    option("--no-host", "no_host"),
    option("-ctk --cache-type-k", "cache_type_k", CACHE_TYPE),
    option("-ctv --cache-type-v", "cache_type_v", CACHE_TYPE),
    option("-dt --defrag-thold", "", DEPRECATED),
    option("-lm --load-mode", "load_mode", LOAD_MODE),
    option("-lzm --lazy-mode", "lazy_mode", LAZY_MODE),
    option("--numa", "numa", NUMA),
    option("-ot --override-tensor", "tensor_buft_overrides", OVERRIDES, write=Write.JOIN),
    option("-cmoe --cpu-moe", "tensor_buft_overrides", write=Write.JOIN, on=f"{MOE_EXPERTS}=CPU"),
    option("-ncmoe --n-cpu-moe", "tensor_buft_overrides", MOE_LAYERS, write=Write.JOIN),
    option("-ngl --gpu-layers --n-gpu-layers", "n_gpu_layers", GPU_LAYERS),
    option("-sm --split-mode", "split_mode", SPLIT_MODE),
    option("-ts --tensor-split", "tensor_split", FLOATS, write=Write.PAD),
    option("-mg --main-gpu", "main_gpu", INT),
    option("-fit --fit", "fit_params", switch(True, False)),
    option("-fitt --fit-target", "fit_params_target", MIB, write=Write.SPLICE),
    option("-fitc --fit-ctx", "fit_params_min_ctx", NATURAL),
    option("--check-tensors", "check_tensors"),
    option("--op-offload", "no_op_offload", negations="--no-op-offload", **_NO),
    option("--lora", "lora_adapters", LORAS, write=Write.EXTEND),
    option("--lora-scaled", "lora_adapters", SCALED_LORAS, write=Write.EXTEND),
    option("-v --verbose --log-verbose", "verbosity", on=INT32[1]),
    option("-lv --verbosity --log-verbosity", "verbosity", INT),
    option("--offline", "offline"),
    # -- sampling -------------------------------------------------------------------------------
    _sampling("--samplers", "samplers", TEXT, "SAMPLERS"),
    _sampling("-s --seed", "seed", SEED),
    option("--ignore-eos", "sampling.ignore_eos"),
    _sampling("--temp --temperature", "temp", TEMPERATURE, "TEMP"),
    _sampling("--top-k", "top_k", INT, "TOP_K"),
    _sampling("--top-p", "top_p", FLOAT, "TOP_P"),
    _sampling("--min-p", "min_p", FLOAT, "MIN_P"),
    _sampling("--xtc-probability", "xtc_probability", FLOAT, "XTC_PROBABILITY"),
    _sampling("--xtc-threshold", "xtc_threshold", FLOAT, "XTC_THRESHOLD"),
    _sampling("--typical --typical-p", "typ_p", FLOAT),
    option("--repeat-last-n", "", PENALTY_LAST_N, extra=marked("PENALTY_LAST_N")),
    _sampling("--repeat-penalty", "penalty_repeat", FLOAT, "PENALTY_REPEAT"),
    _sampling("--presence-penalty", "penalty_present", FLOAT),
    _sampling("--frequency-penalty", "penalty_freq", FLOAT),
    _sampling("--dry-multiplier", "dry_multiplier", FLOAT),
    _sampling("--dry-base", "dry_base", number(1)),
    _sampling("--dry-allowed-length", "dry_allowed_length", INT),
    _sampling("--dry-penalty-last-n", "dry_penalty_last_n", integer(-1)),
    _sampling("--adaptive-target", "adaptive_target", FLOAT),
    _sampling("--adaptive-decay", "adaptive_decay", FLOAT),
    _sampling("--dynatemp-range", "dynatemp_range", FLOAT),
    _sampling("--dynatemp-exp", "dynatemp_exponent", FLOAT),
    _sampling("--mirostat", "mirostat", INT, "MIROSTAT"),
    _sampling("--mirostat-lr", "mirostat_eta", FLOAT, "MIROSTAT_ETA"),
    _sampling("--mirostat-ent", "mirostat_tau", FLOAT, "MIROSTAT_TAU"),
    _sampling("--grammar", "grammar", grammar_kind("USER")),
    _sampling("--grammar-file", "grammar", grammar_kind("USER", file=True)),
    _sampling("-j --json-schema", "grammar", grammar_kind("OUTPUT_FORMAT", schema=True)),
    _sampling("-jf --json-schema-file", "grammar", grammar_kind("OUTPUT_FORMAT", file=True, schema=True)),
    option("-bs --backend-sampling", "sampling.backend_sampling"),
    # -- server ---------------------------------------------------------------------------------
    option("-lcs --lookup-cache-static", "speculative.ngram_cache.lookup_cache_static", TEXT),
    option("-lcd --lookup-cache-dynamic", "speculative.ngram_cache.lookup_cache_dynamic", TEXT),
    option("--kv-unified-per-slot", "kv_unified_per_slot", NATURAL),
    option("-ctxcp --ctx-checkpoints --swa-checkpoints", "n_ctx_checkpoints", INT),
    option("-cms --checkpoint-min-step", "checkpoint_min_step", NATURAL),
    option("-kvu --kv-unified", "kv_unified", negations="-no-kvu --no-kv-unified"),
    option("--cache-idle-slots", "cache_idle_slots", negations="--no-cache-idle-slots"),
    option("--context-shift", "ctx_shift", negations="--no-context-shift"),
    option("-r --reverse-prompt", "antiprompt", ITEM, write=Write.EXTEND),
    option("-sp --special", "special"),
    option("--warmup", "warmup", negations="--no-warmup"),
    option("--pooling", "pooling_type", POOLING),
    option("-cb --cont-batching", "cont_batching", negations="-nocb --no-cont-batching"),
    option("-mm --mmproj", "mmproj.path", TEXT),
    option("--mmproj-auto", "no_mmproj", negations="--no-mmproj --no-mmproj-auto", **_NO),
    option("--mmproj-offload", "mmproj_use_gpu", negations="--no-mmproj-offload"),
    option("-mmdev --mmproj-device", "mmproj_device", DEVICES),
    option("--image-min-tokens", "image_min_tokens", INT),
    option("--image-max-tokens", "image_max_tokens", INT),
    option("--mtmd-batch-max-tokens", "mtmd_batch_max_tokens", INT),
    option("--video-fps", "video_fps", FLOAT),
    option("--video-timestamp-interval", "video_timestamp_interval_ms", INT),
    option("--video-ffmpeg-dir", "video_ffmpeg_bin_dir", TEXT),
    option("--tags", "model_tags", TAGS, write=Write.EXTEND),
    option("--embd-normalize", "embd_normalize", INT),
    option("--reuse-port", "reuse_port"),
    option("--path", "public_path", TEXT),
    option("--cors-origins", "cors_origins", TEXT, extra=(Assign("cors_origins_explicit", True),)),
    option("--cors-methods", "cors_methods", TEXT),
    option("--cors-headers", "cors_headers", TEXT),
    option("--cors-credentials", "cors_credentials", negations="--no-cors-credentials"),
    option("--ui-config --webui-config", "ui_config_json", JSON),
    option("--ui-config-file --webui-config-file", "ui_config_json", FILE),
    option("--ui-mcp-proxy --webui-mcp-proxy", "ui_mcp_proxy", negations="--no-ui-mcp-proxy --no-webui-mcp-proxy"),
    option("--tools", "server_tools", CSV),
    option("--tools-runtime", "server_tools_runtime", TEXT),
    option("--mcp-servers-config", "mcp_servers_config", TEXT),
    option("--mcp-servers-json", "mcp_servers_json", JSON),
    option("-ag --agent", "", negations="-no-ag --no-agent",
           on=(Assign("server_tools", ("all",)), Assign("ui_mcp_proxy", True)),
           off=(Assign("server_tools", ()), Assign("ui_mcp_proxy", False))),
    option("--ui --webui", "ui", negations="--no-ui --no-webui"),
    option("--embedding --embeddings", "embedding"),
    option("--rerank --reranking", "", on=(Assign("embedding", True), Assign("pooling_type", _RANK))),
    option("--ssl-key-file", "ssl_file_key", TEXT),
    option("--ssl-cert-file", "ssl_file_cert", TEXT),
    option("--chat-template-kwargs", "default_template_kwargs", JSON_OBJECT, write=Write.MERGE),
    option("-to --timeout", ("timeout_read", "timeout_write"), INT),
    option("--sse-ping-interval", "sse_ping_interval", INT),
    option("--threads-http", "n_threads_http", INT),
    option("--cache-prompt", "cache_prompt", negations="--no-cache-prompt"),
    option("--cache-reuse", "n_cache_reuse", INT),
    option("-cram --cache-ram", "cache_ram_mib", integer(-1)),
    option("--props", "endpoint_props"),
    option("--slot-save-path", "slot_save_path", DIRECTORY),
    option("--media-path", "media_path", DIRECTORY),
    option("--jinja", "use_jinja", negations="--no-jinja"),
    option("--reasoning-format", "reasoning_format", REASONING_FORMAT),
    option("-rea --reasoning", "", REASONING),
    _sampling("--reasoning-budget", "reasoning_budget_tokens", integer(-1)),
    _sampling("--reasoning-budget-message", "reasoning_budget_message", TEXT),
    option("--chat-template", "chat_template", TEXT),
    option("--chat-template-file", "chat_template", FILE),
    option("--skip-chat-parsing", "force_pure_content_parser", negations="--no-skip-chat-parsing"),
    option("--prefill-assistant", "prefill_assistant", negations="--no-prefill-assistant"),
    option("-sps --slot-prompt-similarity", "slot_prompt_similarity", FLOAT),
    option("--lora-init-without-apply", "lora_init_without_apply"),
    option("--sleep-idle-seconds", "sleep_idle_seconds", SLEEP),
    option("--log-prompts-dir", "path_prompts_log_dir", Kind(lambda text: Directory(text, create=True), "a directory", ".")),
    # -- speculative decoding -------------------------------------------------------------------
    option("--spec-draft-threads -td --threads-draft", f"{_DRAFT}.cpuparams.n_threads", THREADS),
    option("--spec-draft-threads-batch -tbd --threads-batch-draft", f"{_DRAFT}.cpuparams_batch.n_threads", THREADS),
    *_cpu(f"{_DRAFT}.cpuparams", PRIORITY, "--spec-draft-cpu-mask -Cd --cpu-mask-draft",
          "--spec-draft-cpu-range -Crd --cpu-range-draft", "--spec-draft-cpu-strict --cpu-strict-draft",
          "--spec-draft-prio --prio-draft", "--spec-draft-poll --poll-draft"),
    *_cpu(f"{_DRAFT}.cpuparams_batch", PRIORITY, "--spec-draft-cpu-mask-batch -Cbd --cpu-mask-batch-draft",
          "--spec-draft-cpu-range-batch -Crbd --cpu-range-batch-draft",
          "--spec-draft-cpu-strict-batch --cpu-strict-batch-draft", "--spec-draft-prio-batch --prio-batch-draft",
          "--spec-draft-poll-batch --poll-batch-draft"),
    option("--spec-draft-type-k -ctkd --cache-type-k-draft", f"{_DRAFT}.cache_type_k", CACHE_TYPE),
    option("--spec-draft-type-v -ctvd --cache-type-v-draft", f"{_DRAFT}.cache_type_v", CACHE_TYPE),
    option("--spec-draft-override-tensor -otd --override-tensor-draft", f"{_DRAFT}.tensor_buft_overrides", OVERRIDES,
           write=Write.JOIN),
    option("--spec-draft-cpu-moe -cmoed --cpu-moe-draft", f"{_DRAFT}.tensor_buft_overrides", write=Write.JOIN,
           on=f"{MOE_EXPERTS}=CPU"),
    option("--spec-draft-n-cpu-moe --spec-draft-ncmoe -ncmoed --n-cpu-moe-draft", f"{_DRAFT}.tensor_buft_overrides",
           MOE_LAYERS, write=Write.JOIN),
    option("--spec-draft-n-max", f"{_DRAFT}.n_max", INT),
    option("--spec-draft-n-min", f"{_DRAFT}.n_min", INT),
    option("--spec-synth-len", "speculative.synth_len", FLOAT),
    option("--spec-synth-rates", "speculative.synth_rates", FLOATS),
    option("--spec-draft-p-split --draft-p-split", f"{_DRAFT}.p_split", FLOAT),
    option("--spec-draft-p-min --draft-p-min", f"{_DRAFT}.p_min", FLOAT),
    option("--spec-draft-backend-sampling", f"{_DRAFT}.backend_sampling", negations="--no-spec-draft-backend-sampling"),
    option("--spec-draft-sampling", f"{_DRAFT}.probabilistic", choice({"greedy": False, "probabilistic": True})),
    option("--spec-draft-device -devd --device-draft", f"{_DRAFT}.devices", DEVICES),
    option("--spec-draft-ngl -ngld --gpu-layers-draft --n-gpu-layers-draft", f"{_DRAFT}.n_gpu_layers", GPU_LAYERS),
    option("--spec-draft-model -md --model-draft", f"{_DRAFT}.mparams.path", TEXT),
    option("--spec-type", "speculative.types", SPEC_TYPES, write=Write.EXTEND),
    option("--spec-ngram-mod-n-min", "speculative.ngram_mod.n_min", integer(0, 1024)),
    option("--spec-ngram-mod-n-max", "speculative.ngram_mod.n_max", integer(0, 1024)),
    option("--spec-ngram-mod-n-match", "speculative.ngram_mod.n_match", NGRAM),
    option("--spec-ngram-simple-size-n", "speculative.ngram_simple.size_n", NGRAM),
    option("--spec-ngram-simple-size-m", "speculative.ngram_simple.size_m", NGRAM),
    option("--spec-ngram-simple-min-hits", "speculative.ngram_simple.min_hits", integer(1)),
    option("--spec-ngram-map-k-size-n", "speculative.ngram_map_k.size_n", NGRAM),
    option("--spec-ngram-map-k-size-m", "speculative.ngram_map_k.size_m", NGRAM),
    option("--spec-ngram-map-k-min-hits", "speculative.ngram_map_k.min_hits", integer(1)),
    option("--spec-ngram-map-k4v-size-n", "speculative.ngram_map_k4v.size_n", NGRAM),
    option("--spec-ngram-map-k4v-size-m", "speculative.ngram_map_k4v.size_m", NGRAM),
    option("--spec-ngram-map-k4v-min-hits", "speculative.ngram_map_k4v.min_hits", integer(1)),
)


def _paddler(flag: str) -> str:
    return f"is set by paddler; use paddler agent {flag} instead"


_DOWNLOAD = "downloads a model, which only llama.cpp's own command line can do; give a local file"
_REMOVED = "was removed from llama.cpp; use {}"

REFUSED: Mapping[str, str] = {
    **dict.fromkeys(("-m", "--model"), _paddler("--model")),
    "--host": _paddler("--local-llamacpp-host"),
    "--port": _paddler("--local-llamacpp-port"),
    **dict.fromkeys(("-np", "--parallel"), _paddler("--slots")),
    **dict.fromkeys(("-c", "--ctx-size"), _paddler("--context-size")),
    **dict.fromkeys(("-t", "--threads"), _paddler("--threads")),
    **dict.fromkeys(("-a", "--alias"), _paddler("--model-alias")),
    **dict.fromkeys(("--api-key", "--api-key-file"), _paddler("--local-llamacpp-api-key")),
    **dict.fromkeys(("--slots", "--no-slots"), "is set by paddler, which balances by GET /slots "
                                               "(paddler agent --slots sets how many there are)"),
    "--metrics": "is set by paddler, which always enables GET /metrics",
    "--api-prefix": "would move every route, but paddler reaches llama.cpp at its root",
    **dict.fromkeys((
        "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-hft", "--hf-token", "-mu", "--model-url", "-dr",
        "--docker-repo", "-mmu", "--mmproj-url", "--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft",
        "--spec-default", "--embd-gemma-default", "--fim-qwen-1.5b-default", "--fim-qwen-3b-default",
        "--fim-qwen-7b-default", "--fim-qwen-7b-spec", "--fim-qwen-14b-spec", "--fim-qwen-30b-default",
        "--gpt-oss-20b-default", "--gpt-oss-120b-default", "--vision-gemma-4b-default", "--vision-gemma-12b-default",
    ), _DOWNLOAD),
    **dict.fromkeys(("--models-dir", "--models-preset", "--models-max", "--models-autoload", "--no-models-autoload"),
                    "belongs to llama.cpp's router mode, and paddler runs one model per agent"),
    **dict.fromkeys(("--log-disable", "--log-file", "--log-colors", "--log-prefix", "--no-log-prefix",
                     "--log-timestamps", "--no-log-timestamps", "--log-jsonl", "--no-log-jsonl"),
                    "configures llama.cpp's logger, which xllamacpp does not expose (-lv sets the verbosity)"),
    **dict.fromkeys(("-dev", "--device", "--rpc", "--override-kv", "--control-vector", "--control-vector-scaled",
                     "--control-vector-layer-range", "-l", "--logit-bias", "--top-nsigma", "--top-n-sigma",
                     "--dry-sequence-breaker", "--spm-infill", "--sampler-seq", "--sampling-seq", "--moe-cache-mib",
                     "-ncffn", "--n-cpu-ffn", "--reasoning-effort", "--reasoning-preserve", "--no-reasoning-preserve"),
                    "has no setting that xllamacpp, the embedded llama.cpp server, can take"),
    **dict.fromkeys(("-h", "--help", "--usage", "--version", "-cl", "--cache-list", "--completion-bash",
                     "--list-devices"), "prints something and exits; run llama-server itself for that"),
    **dict.fromkeys(("--mlock", "--mmap", "--no-mmap", "-dio", "--direct-io", "-ndio", "--no-direct-io"),
                    "was replaced in llama.cpp by --load-mode (none, mmap, mlock, mmap+mlock or dio)"),
    **dict.fromkeys(("--draft", "--draft-n", "--draft-max"), _REMOVED.format("--spec-draft-n-max or --spec-ngram-mod-n-max")),
    **dict.fromkeys(("--draft-min", "--draft-n-min"), _REMOVED.format("--spec-draft-n-min or --spec-ngram-mod-n-min")),
    **dict.fromkeys(("--spec-ngram-size-n", "--spec-ngram-size-m", "--spec-ngram-min-hits"),
                    _REMOVED.format("the --spec-ngram-<type>-... option of one type")),
}
# fmt: on
