"""The OpenAI API's request bodies as pydantic models, and their mapping onto SamplingParams.

Unknown fields are ignored (clients send many optional ones); fields that would change the
answer in ways the engine does not implement are refused with a clear message.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvflock.worker.config import SamplingParams, StructuredOutput


class StreamOptions(BaseModel):
    include_usage: bool = False


def _json_schema(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """A JSON Schema given as an object or as its JSON text."""
    if not isinstance(value, str):
        return value
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON Schema must be an object, got {type(schema).__name__}")
    return schema


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema. The schema is always enforced, strict or not."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or JSON that validates against a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is 'json_schema'")
        return self


class StructuredOutputsParams(BaseModel):
    """vLLM's structured_outputs: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @field_validator("json_")
    @classmethod
    def _schema(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        return _json_schema(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputsParams":
        given = [name.rstrip("_") for name, value in self if value not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"exactly one of json, regex, choice, grammar, json_object must be set; got "
                             f"{given or 'none'}")
        return self

    def constraint(self) -> tuple[str, StructuredOutput]:
        """The field that is set and its constraint."""
        if self.json_ is not None:
            return "json", StructuredOutput(json_schema=self.json_)
        if self.json_object:
            return "json_object", StructuredOutput(json_object=True)
        field = next(name for name in ("regex", "choice", "grammar") if getattr(self, name) is not None)
        return field, StructuredOutput(**{field: getattr(self, field)})


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions that vLLM users expect.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    @field_validator("guided_json")
    @classmethod
    def _guided_schema(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        return _json_schema(value)

    @model_validator(mode="after")
    def _unsupported(self) -> "_SamplingFields":
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": self.stop_token_ids,
        }
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_output=self.structured_output(),
            **{k: v for k, v in given.items() if v is not None},
        )

    def structured_output(self) -> StructuredOutput | None:
        """The structured output the request asks for, None when it asks for none; a ValueError
        naming the fields when it asks for more than one."""
        constraints = self._structured_outputs()
        if len(constraints) > 1:
            first, *others = (field.partition(".")[0] for field in constraints)
            raise ValueError(f"{first}: cannot be combined with {', '.join(others)}; a request takes one structured "
                             f"output constraint (response_format, structured_outputs or one guided_* field)")
        return next(iter(constraints.values()), None)

    @property
    def structured_output_field(self) -> str | None:
        """The request field that holds the structured output, for errors about it."""
        return next(iter(self._structured_outputs()), None)

    def _structured_outputs(self) -> dict[str, StructuredOutput]:
        found: dict[str, StructuredOutput] = {}
        response_format = self.response_format or ResponseFormat(type="text")
        if response_format.type == "json_schema" and response_format.json_schema is not None:
            found["response_format.json_schema.schema"] = StructuredOutput(
                json_schema=response_format.json_schema.schema_)
        elif response_format.type == "json_object":
            found["response_format"] = StructuredOutput(json_object=True)
        if self.structured_outputs is not None:
            field, constraint = self.structured_outputs.constraint()
            found[f"structured_outputs.{field}"] = constraint
        guided = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
        for name, kind in guided.items():
            if getattr(self, name) is not None:
                found[name] = StructuredOutput(**{kind: getattr(self, name)})
        return found

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_checks(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _chat_checks(self) -> "ChatCompletionRequest":
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
