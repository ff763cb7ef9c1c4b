"""llama-server options for the embedded llama.cpp: parsed without xllamacpp, applied to a real one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import xllamacpp

from paddler.agent.llamacpp_option_kinds import Assign, EnumRef, Option
from paddler.agent.llamacpp_option_table import OPTIONS, REFUSED
from paddler.agent.llamacpp_options import LlamaCppOptionError, LlamaCppOptions, apply, parse


def applied(*args: str) -> xllamacpp.CommonParams:
    params = xllamacpp.CommonParams()
    apply(parse(args), params)
    return params


def refusal(*args: str) -> str:
    with pytest.raises(LlamaCppOptionError) as caught:
        parse(args)
    return str(caught.value)


# -- parse --------------------------------------------------------------------------------------


def test_parse_takes_a_value_as_the_next_argument_or_after_an_equals_sign() -> None:
    """``--batch-size 512`` and ``--batch-size=512`` set the same field to the same value."""
    assert parse(["--batch-size", "512"]) == parse(["--batch-size=512"])
    assert parse(["--batch-size", "512"]).settings[0].assignments == (Assign("n_batch", 512),)


def test_parse_reads_every_spelling_of_an_option_alike() -> None:
    """-ngl, --gpu-layers and --n-gpu-layers are one option, with llama.cpp's words auto and all."""
    spellings = [
        parse([name, "99"]).settings[0].assignments
        for name in ("-ngl", "--gpu-layers", "--n-gpu-layers")
    ]
    assert spellings == [(Assign("n_gpu_layers", 99),)] * 3
    assert parse(["-ngl", "all"]).settings[0].assignments == (Assign("n_gpu_layers", -2),)


def test_parse_reads_underscores_in_a_long_option_as_dashes() -> None:
    """llama.cpp accepts ``--batch_size`` for ``--batch-size``, and so does paddler."""
    assert parse(["--batch_size", "8"]).settings[0].assignments == (Assign("n_batch", 8),)


def test_parse_turns_a_switch_on_and_its_negation_off() -> None:
    """--cont-batching sets True and --no-cont-batching False; -nkvo sets no_kv_offload True."""
    assert parse(["-cb"]).settings[0].assignments == (Assign("cont_batching", True),)
    assert parse(["--no-cont-batching"]).settings[0].assignments == (
        Assign("cont_batching", False),
    )
    assert parse(["-nkvo"]).settings[0].assignments == (Assign("no_kv_offload", True),)


def test_parse_names_enum_members_by_llamacpp_value_names() -> None:
    """--pooling mean and --flash-attn enabled (llama.cpp's synonym of on) name enum members."""
    pooling = parse(["--pooling", "mean"]).settings[0].assignments
    assert pooling == (
        Assign("pooling_type", EnumRef("llama_pooling_type", "LLAMA_POOLING_TYPE_MEAN")),
    )
    flash = parse(["-fa", "enabled"]).settings[0].assignments
    assert flash == (
        Assign(
            "flash_attn_type", EnumRef("llama_flash_attn_type", "LLAMA_FLASH_ATTN_TYPE_ENABLED")
        ),
    )


def test_parse_keeps_the_command_line_order() -> None:
    """Settings come out in the order given, so that a later option wins as in llama.cpp."""
    options = parse(["--temp", "0.5", "--embeddings", "--temp", "0.7"])
    assert [setting.spelling for setting in options.settings] == [
        "--temp",
        "--embeddings",
        "--temp",
    ]


def test_parse_of_no_options_is_empty() -> None:
    """No options parse to an empty, falsy result."""
    assert parse([]) == LlamaCppOptions()
    assert not parse([])


def test_parse_refuses_an_unknown_option_and_lists_the_accepted_ones() -> None:
    """An unknown option is named, with the options the embedded server accepts."""
    message = refusal("--foo")
    assert message.startswith(
        "unknown llama.cpp option '--foo' (the embedded llama.cpp server accepts: "
    )
    assert "--embeddings" in message and "--pooling" in message


def test_parse_suggests_the_option_a_misspelt_one_resembles() -> None:
    """--ctx-shift is not llama-server's spelling; the message points at --context-shift."""
    assert "'--ctx-shift'; did you mean --context-shift?" in refusal("--ctx-shift")


def test_parse_refuses_a_value_outside_an_enum_and_lists_the_value_names() -> None:
    """--pooling avg is refused with llama.cpp's pooling names."""
    assert (
        refusal("--pooling", "avg")
        == "--pooling expects one of none, mean, cls, last, rank; got 'avg'"
    )


def test_parse_refuses_values_that_are_not_numbers_or_out_of_range() -> None:
    """Integers, numbers and their ranges are checked before llama.cpp sees them."""
    assert refusal("--batch-size", "lots") == "--batch-size expects an integer; got 'lots'"
    assert refusal("--temp", "hot") == "--temp expects a number; got 'hot'"
    assert refusal("--seed", "-5") == "--seed expects an integer from -1 to 4294967295; got '-5'"
    assert refusal("--sleep-idle-seconds", "0").startswith("--sleep-idle-seconds expects -1 or")
    assert refusal("--batch-size", str(2**31)).startswith("--batch-size expects an integer;")


def test_parse_refuses_an_option_without_its_value() -> None:
    """A value missing at the end, or replaced by the next option, is reported as such."""
    assert refusal("--pooling").endswith("; got nothing")
    assert refusal("--chat-template", "--jinja").endswith("; got the option '--jinja'")


def test_parse_refuses_a_value_given_to_a_switch() -> None:
    """--embeddings takes no value."""
    assert refusal("--embeddings=1") == "--embeddings takes no value; got '--embeddings=1'"


def test_parse_refuses_an_argument_that_is_not_an_option() -> None:
    """A stray word among the options is refused, not ignored."""
    assert refusal("--embeddings", "mean").startswith("unexpected argument 'mean'")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("-m", "x.gguf"), "--model"),
        (("--host", "0.0.0.0"), "--local-llamacpp-host"),
        (("--port", "1"), "--local-llamacpp-port"),
        (("-np", "4"), "--slots"),
        (("--parallel", "4"), "--slots"),
        (("-c", "4096"), "--context-size"),
        (("--ctx-size", "4096"), "--context-size"),
        (("-t", "4"), "--threads"),
        (("-a", "name"), "--model-alias"),
        (("--alias", "name"), "--model-alias"),
        (("--api-key", "k"), "--local-llamacpp-api-key"),
    ],
)
def test_parse_refuses_what_the_agent_sets_and_names_the_paddler_flag(
    args: tuple[str, ...], flag: str
) -> None:
    """Options the agent controls are refused with the paddler agent flag to use instead."""
    assert (
        refusal(*args)
        == f"llama.cpp option {args[0]} is set by paddler; use paddler agent {flag} instead"
    )


@pytest.mark.parametrize("spelling", ["--no-slots", "--slots", "--metrics"])
def test_parse_refuses_the_other_settings_the_agent_owns(spelling: str) -> None:
    """The prompt cache size and the /slots and /metrics endpoints are paddler's."""
    assert refusal(spelling, "1").startswith(f"llama.cpp option {spelling} is set by paddler")


def test_parse_refuses_options_llamacpp_replaced_and_names_the_replacement() -> None:
    """--mlock and --no-mmap became --load-mode; --draft-max became --spec-draft-n-max."""
    assert "--load-mode" in refusal("--mlock")
    assert "--load-mode" in refusal("--no-mmap")
    assert "--spec-draft-n-max" in refusal("--draft-max", "8")


def test_parse_refuses_downloads_which_the_embedded_server_cannot_do() -> None:
    """-hf needs llama.cpp's own command line; the operator is told to give a local file."""
    assert refusal("-hf", "ggml-org/model").endswith("give a local file")


def test_every_spelling_belongs_to_one_option_only() -> None:
    """No spelling is in the table twice, or both accepted and refused."""
    spellings = Counter(
        spelling for option in OPTIONS for spelling in (*option.names, *option.negations)
    )
    spellings.update(list(REFUSED))
    assert [spelling for spelling, count in spellings.items() if count > 1] == []


# -- apply --------------------------------------------------------------------------------------


def test_apply_sets_the_fields_of_a_real_common_params() -> None:
    """The options operators pass most land in the CommonParams fields llama-server would set."""
    params = applied(
        "--embeddings", "--pooling", "mean", "-ngl", "99", "--flash-attn", "on", "--context-shift",
        "--jinja", "--chat-template", "chatml", "--temp", "0.7", "--cache-type-k", "q8_0",
        "--no-webui", "--threads-http", "4", "--rope-scaling", "linear", "--cache-reuse", "256",
        "--mmproj", "projector.gguf", "--timeout", "600", "--n-predict", "512",
        "--batch-size", "512", "--ubatch-size", "256", "--keep", "16", "--seed", "42",
        "--top-k", "40", "--top-p", "0.9", "--min-p", "0.05", "--repeat-penalty", "1.1",
        "--kv-unified", "--swa-full", "--sleep-idle-seconds", "300", "--reasoning-format", "none",
        "--no-cont-batching", "--load-mode", "mlock", "-tb", "3", "--no-kv-offload",
    )  # fmt: skip
    assert params.embedding is True
    assert params.pooling_type == xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    assert params.n_gpu_layers == 99
    assert params.flash_attn_type == xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert params.ctx_shift is True and params.use_jinja is True
    assert params.chat_template == "chatml"
    assert params.sampling.temp == pytest.approx(0.7)
    assert params.cache_type_k == xllamacpp.ggml_type.GGML_TYPE_Q8_0
    assert params.ui is False
    assert params.n_threads_http == 4
    assert (
        params.rope_scaling_type == xllamacpp.llama_rope_scaling_type.LLAMA_ROPE_SCALING_TYPE_LINEAR
    )
    assert params.n_cache_reuse == 256
    assert params.mmproj.path == "projector.gguf"
    assert (params.timeout_read, params.timeout_write) == (600, 600)
    assert (params.n_predict, params.n_batch, params.n_ubatch, params.n_keep) == (512, 512, 256, 16)
    assert (params.sampling.seed, params.sampling.top_k) == (42, 40)
    assert params.sampling.top_p == pytest.approx(0.9)
    assert params.sampling.min_p == pytest.approx(0.05)
    assert params.sampling.penalty_repeat == pytest.approx(1.1)
    assert params.kv_unified is True and params.swa_full is True
    assert params.sleep_idle_seconds == 300
    assert params.reasoning_format == xllamacpp.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
    assert params.cont_batching is False
    assert params.load_mode == xllamacpp.llama_load_mode.LLAMA_LOAD_MODE_MLOCK
    assert params.cpuparams_batch.n_threads == 3
    assert params.no_kv_offload is True


def test_apply_lets_a_later_option_win() -> None:
    """As in llama.cpp, the last of two values for one field is the one kept."""
    assert applied("--temp", "0.5", "--temperature", "0.25").sampling.temp == pytest.approx(0.25)


def test_apply_reranking_turns_on_embeddings_with_rank_pooling() -> None:
    """--reranking is llama.cpp's shorthand for embeddings pooled by rank."""
    params = applied("--reranking")
    assert params.embedding is True
    assert params.pooling_type == xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_RANK


def test_apply_marks_sampling_values_as_the_operators_choice() -> None:
    """--temp and --top-k set their user_sampling_config bits, so the model's defaults do not win."""
    flags = xllamacpp.common_params_sampling_config
    marked = applied("--temp", "0.2", "--top-k", "5").sampling.user_sampling_config
    assert (
        marked
        == flags.COMMON_PARAMS_SAMPLING_CONFIG_TEMP | flags.COMMON_PARAMS_SAMPLING_CONFIG_TOP_K
    )


def test_apply_adds_repeatable_options_to_what_is_there() -> None:
    """--lora (comma-separated, repeatable), --lora-scaled, -r and --tags accumulate."""
    params = applied(
        "--lora", "a.gguf,b.gguf", "--lora-scaled", "c.gguf:0.5", "-r", "User:", "-r", "###",
        "--tags", "x, y", "--tags", "z",
    )  # fmt: skip
    assert [(lora.path, lora.scale) for lora in params.lora_adapters] == [
        ("a.gguf", 1.0),
        ("b.gguf", 1.0),
        ("c.gguf", 0.5),
    ]
    assert params.antiprompt == ["User:", "###"]
    assert params.model_tags == {"x", "y", "z"}


def test_apply_sets_several_fields_for_reasoning_and_template_kwargs() -> None:
    """--reasoning off disables thinking in both places llama.cpp reads it."""
    params = applied("--chat-template-kwargs", '{"style": "short"}', "-rea", "off")
    assert params.enable_reasoning == 0
    assert params.default_template_kwargs == {"style": '"short"', "enable_thinking": "false"}


def test_apply_fills_device_lists_as_llamacpp_does() -> None:
    """-ts pads the proportions with zeros; a single --fit-target applies to every device."""
    params = applied("-ts", "3,1", "--fit-target", "512")
    assert params.tensor_split[:3] == [3.0, 1.0, 0.0]
    assert set(params.fit_params_target) == {512 << 20}


def test_apply_ors_cpu_masks_and_marks_them_valid() -> None:
    """-C and -Cr add CPUs to the affinity mask, as llama.cpp's parser does."""
    params = applied("-C", "0x3", "-Cr", "8-9")
    assert [cpu for cpu, used in enumerate(params.cpuparams.cpumask) if used] == [0, 1, 8, 9]
    assert params.cpuparams.mask_valid is True


def test_apply_reads_files_and_checks_directories(tmp_path: Path) -> None:
    """--chat-template-file is read, and --slot-save-path gets the trailing slash llama.cpp adds."""
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    params = applied("--chat-template-file", str(template), "--slot-save-path", str(tmp_path))
    assert params.chat_template == "{{ messages }}"
    assert params.slot_save_path == f"{tmp_path}/"


def test_apply_refuses_a_value_it_cannot_use_and_names_the_option(tmp_path: Path) -> None:
    """A slot directory that does not exist is an error naming --slot-save-path."""
    with pytest.raises(
        LlamaCppOptionError,
        match=r"^llama.cpp option --slot-save-path cannot be applied: not a directory",
    ):
        applied("--slot-save-path", str(tmp_path / "missing"))


def _example_args(option: Option) -> list[str]:
    if option.kind is None:
        return [option.names[-1]]
    return [option.names[-1], option.kind.example]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.names[-1])
def test_apply_takes_every_option_of_the_table(
    option: Option, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each option, with its example value, names real fields, types and enum members."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("{}")
    (tmp_path / "schema.json").write_text("{}")
    (tmp_path / "grammar.gbnf").write_text('root ::= "a"')
    applied(*_example_args(option))
    for negation in option.negations:
        applied(negation)
