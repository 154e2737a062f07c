"""The YAML recipe: what to build, pinned.

One pydantic model per section, ``extra="forbid"`` everywhere, so a typo is an error naming the
field and the accepted names. Validation has no side effects: it imports no backend, touches no
disk and downloads nothing. Command-line flags and ``--set a.b=value`` override fields before
validation, so the resolved recipe is the single source of truth stored in every artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmopt.errors import RecipeError
from llmopt.registry import TARGETS

DTYPES = ("fp32", "fp16", "bf16")
WEIGHT_FORMATS = ("none", "int8", "int4", "fp8")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    id: str = Field(description="Hugging Face Hub id, local checkpoint directory, or .gguf file")
    revision: str | None = None
    trust_remote_code: bool = False
    adapter: str | None = Field(
        None, description="PEFT LoRA adapter (directory or Hub id) merged into the weights before export")


class Shapes(Section):
    batch_size: int = Field(1, ge=1, le=1024)
    sequence_length: int = Field(512, ge=8, le=1_048_576, description="prompt plus generated tokens")
    static: bool = Field(False, description="no dynamic dimension at all: padded prefill + one-token decode graphs")


class Precision(Section):
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


class Quantization(Section):
    weight_format: Literal["none", "int8", "int4", "fp8"] = "none"
    symmetric: bool | None = Field(None, description="None lets the target pick its best default")
    group_size: int | None = Field(None, ge=-1, description="-1 means per-channel; None picks one that divides")
    ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="share of layers in int4, the rest int8; unset: the target's default "
        "(openvino: all int4; onnx: the qkv and down projections in int8)")
    algorithm: Literal["auto", "rtn", "awq", "hqq", "gptq"] = Field(
        "auto", description="auto: the target's best default (openvino int4: AWQ + scale estimation); rtn: data-free"
    )
    awq: bool = Field(False, description="AWQ; with algorithm auto, int4 turns it on unless set false explicitly")
    scale_estimation: bool = Field(False, description="NNCF scale estimation; as awq for algorithm auto")
    all_layers: bool = Field(False, description="int4 for the embeddings and last MatMul too (int8 otherwise)")
    dataset: str | None = Field(
        None, description="calibration text: a shipped set (default, chat, pydoc) or a local .txt/.jsonl file"
    )
    num_samples: int = Field(64, ge=1, description="calibration samples")
    sensitivity_metric: str | None = Field(None, description="ranks layers for mixed precision (ratio < 1)")
    kv_cache: Literal["auto", "fp32", "fp16", "u8", "int8", "fp8"] = "auto"

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be a positive group size, or -1 for one group per output channel")
        return value

    @property
    def enabled(self) -> bool:
        return self.weight_format != "none"


class OpenVINOOptions(Section):
    device: str = "CPU"
    ov_config: dict[str, str | int | float | bool] = Field(default_factory=dict)


class OnnxOptions(Section):
    provider: Literal["cpu", "cuda", "tensorrt"] = Field(
        "cpu", description="cpu, cuda (onnxruntime-genai or static graphs), tensorrt (static graphs compiled into "
                           "TensorRT engines by onnxruntime's TensorRT execution provider, saved as EPContext models)",
    )
    opset: int | None = Field(None, ge=13, le=23)
    provider_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="more TensorRT execution provider options by their onnxruntime names, "
                                          "e.g. {trt_builder_optimization_level: 5}",
    )


class NeuronOptions(Section):
    """optimum-neuron export settings (``llmopt.exporters.neuron``)."""

    num_cores: int | None = Field(
        None, ge=1, le=128,
        description="NeuronCores the model is sharded over (optimum-neuron's compiler_args num_cores); "
                    "defaults to all cores of instance_type, else 2",
    )
    tensor_parallel_size: int | None = Field(
        None, ge=1, le=128, description="optimum-neuron>=0.4's name for num_cores; give one or the other"
    )
    instance_type: str | None = Field(None, description="e.g. inf2.xlarge, inf2.48xlarge, trn1.32xlarge")
    compiler_args: dict[str, Any] = Field(
        default_factory=dict,
        description="extra neuronx-cc flags, passed as NEURON_CC_FLAGS: {optlevel: 3} -> --optlevel=3, {flag: true} -> --flag",
    )
    compile_only: bool = Field(
        False, description="compile on a host without a Neuron device (sets NEURON_PLATFORM_TARGET_OVERRIDE); needs instance_type"
    )


class TensorRTOptions(Section):
    """TensorRT-LLM engine build settings (``llmopt.exporters.tensorrt``)."""

    gpu: str | None = Field(None, description="GPU the engine is built for, e.g. H100, A100, L4 (checked against the recipe)")
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    max_input_len: int | None = Field(None, ge=1, description="longest prompt; defaults to sequence_length - 1")
    max_num_tokens: int | None = Field(None, ge=1, description="tokens per engine step; defaults to batch_size x max_input_len")
    kv_cache_dtype: Literal["auto", "fp16", "bf16", "fp8", "int8"] = "auto"
    gather_context_logits: bool = Field(
        False, description="build the engine to return prompt logits (needed for llmopt's teacher-forced validation)"
    )
    calibration_device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="where modelopt calibrates fp8 / int4-awq / int8-sq weights before the build"
    )
    builder_args: dict[str, Any] = Field(default_factory=dict, description="extra tensorrt_llm BuildConfig arguments")


class Generation(Section):
    """``run``'s defaults. Unset fields come from the checkpoint's generation_config.json, else from
    llmopt's chat defaults (``llmopt.generation.CHAT_DEFAULTS``); run flags override both."""

    max_new_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=100.0, description="0 means greedy")
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    seed: Optional[int] = None


class Validation(Section):
    enabled: bool = True
    max_tokens: int = Field(192, ge=8, description="teacher-forced tokens of the fixed validation text")
    min_top1_agreement: float = Field(0.95, ge=0.0, le=1.0)
    max_mean_kl: float = Field(0.05, ge=0.0)


class Recipe(Section):
    model: ModelSpec
    target: str
    shapes: Shapes = Field(default_factory=Shapes)
    precision: Precision = Field(default_factory=Precision)
    quantization: Quantization = Field(default_factory=Quantization)
    openvino: OpenVINOOptions = Field(default_factory=OpenVINOOptions)
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    neuron: NeuronOptions = Field(default_factory=NeuronOptions)
    tensorrt: TensorRTOptions = Field(default_factory=TensorRTOptions)
    generation: Generation = Field(default_factory=Generation)
    validation: Validation = Field(default_factory=Validation)

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        if value not in TARGETS:
            raise ValueError(f"unknown target '{value}'; accepted: {', '.join(TARGETS)}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading, overriding, error messages ------------------------------------------------------


def _accepted_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names accepted at the parent of ``loc``, for 'unknown field' messages."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def format_validation_error(exc: ValidationError, source: str = "recipe") -> str:
    """First pydantic error as one line: which field, what is wrong, what is accepted."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    field = ".".join(str(part) for part in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        accepted = _accepted_fields(Recipe, loc)
        message = f"{source} field '{field}': unknown field"
        if accepted:
            message += f"; accepted: {', '.join(accepted)}"
    elif error["type"] == "missing":
        message = f"{source} field '{field}': required but not given"
    else:
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        reason = error["msg"].removeprefix("Value error, ")
        message = f"{source} field '{field}': {reason}{shown}"
    extra = len(exc.errors()) - 1
    if extra:
        message += f" [and {extra} more error{'s' if extra > 1 else ''}]"
    return message


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML would read it: 64 -> int, true -> bool, fp16 -> str."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections as needed. Dashes count as underscores."""
    parts = [part.replace("-", "_") for part in dotted.split(".")]
    if not all(parts):
        raise RecipeError(f"--set '{dotted}': empty field name; expected e.g. shapes.batch_size=4")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_set_options(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set '{item}': expected FIELD=VALUE, e.g. quantization.group_size=64")
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe file '{path}' is not valid YAML{where}") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file '{path}' is not UTF-8 text") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file '{path}' must be a mapping of sections (model, target, shapes, ...)")
    return data


def resolve(
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Recipe:
    """Recipe file (optional) + overrides (dotted path -> value) -> validated Recipe.

    Overrides whose value is None are ignored, so CLI flags that were not given can be passed
    through unconditionally.
    """
    data: dict[str, Any] = dict(base or {})
    if config is not None:
        data.update(read_recipe_file(config))
    source = f"recipe '{config}'" if config else "recipe"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_path(data, dotted, value)
    if isinstance(data.get("model"), str):  # `model: some/id` is shorthand for `model: {id: ...}`
        data["model"] = {"id": data["model"]}
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from exc
