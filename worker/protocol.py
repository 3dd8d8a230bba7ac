"""The OpenAI API's request bodies as pydantic models, and their mapping onto SamplingParams.

Unknown fields are ignored (clients send many optional ones); fields that would change the
answer in ways the engine does not implement are refused with a clear message
(kvflock.worker.api_fields lists which). Validation is strict: JSON's types are taken as they are
(`true` is not the token id 1, `3.0` is not `n` 3), and text must be valid Unicode (a lone UTF-16
surrogate, which JSON's escapes can carry, is refused before it reaches the tokenizer).
"""

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from kvflock.shared.request_text import LONE_SURROGATE, first_lone_surrogate
from kvflock.shared.stream_seam import CONTINUATION_FIELD
from kvflock.worker.api_errors import FieldError
from kvflock.worker.api_fields import Endpoint, refuse_unsupported
from kvflock.worker.config import SamplingParams, StructuredOutput

_STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT

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

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or JSON that validates against a schema."""

    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is 'json_schema'")
        return self


class StructuredOutputsParams(BaseModel):
    """vLLM's structured_outputs: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", strict=True)

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


class Continuation(BaseModel):
    """The router's: this streamed request continues one that another worker started and lost
    (kvflock.shared.stream_seam). The client has received the one choice's `token_ids` and
    `text_chars` characters of its text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    token_ids: list[int] = Field(min_length=1)
    text_chars: int = Field(ge=0)


class _SamplingFields(BaseModel):
    model_config = _STRICT
    endpoint: ClassVar[Endpoint]

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = first_lone_surrogate(data)
        if where is not None:
            raise FieldError(where, LONE_SURROGATE)
        return data

    model: str
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[Annotated[int, Strict(False)], float] | None = None  # JSON's keys are strings
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
    kvflock_continuation: Continuation | None = None

    @field_validator("guided_json")
    @classmethod
    def _guided_schema(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        return _json_schema(value)

    @model_validator(mode="before")
    @classmethod
    def _refused_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unsupported(data, cls.endpoint)
        return data

    @model_validator(mode="after")
    def _continues_one_stream(self) -> "_SamplingFields":
        if self.kvflock_continuation is not None and not self.stream:
            raise ValueError(f"{CONTINUATION_FIELD}: continues a stream; needs stream=true")
        if self.kvflock_continuation is not None and self.n != 1:
            raise ValueError(f"{CONTINUATION_FIELD}: continues one choice; needs n=1, got n={self.n}")
        return self

    @model_validator(mode="after")
    def _best_of_is_n(self) -> "_SamplingFields":
        # The n choices are all returned; ranking more candidates than that is not implemented.
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: {self.best_of} differs from n={self.n}; only best_of == n is supported")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        tool_constraint: StructuredOutput | None = None) -> SamplingParams:
        """The engine's parameters; `tool_constraint` is what a required or named tool_choice forces."""
        structured_output = self.structured_output()
        if tool_constraint is not None:
            if structured_output is not None:
                raise ValueError(f"tool_choice: a required or named tool choice cannot be combined with "
                                 f"{self.structured_output_field}")
            structured_output = tool_constraint
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": self.logit_bias,
            "structured_output": structured_output,
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
    endpoint = "completions"

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _completion_checks(self) -> "CompletionRequest":
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: not supported together with logprobs (prompt logprobs are not computed)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.kvflock_continuation is not None and len(self.prompts()) != 1:
            raise ValueError(f"{CONTINUATION_FIELD}: continues one choice; needs a single prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallItem(BaseModel):
    model_config = _STRICT

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages make tool calls, not {self.role!r} ones")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message answers a call and must name its id")
        return self

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' convention): a call's arguments
        as an object, not OpenAI's JSON text, since templates write them out with `tojson`."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # a template that writes it out shows what the client sent


class FunctionDefinition(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


# apply_chat_template's own arguments, which chat_template_kwargs may not override.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def _own_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    taken = sorted(set(kwargs or {}) & _RESERVED_TEMPLATE_KWARGS)
    if taken:
        raise ValueError(f"{taken} are set by the request's own fields, not here")
    return kwargs


# Variables for the chat template (e.g. enable_thinking).
TemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(_own_template_kwargs)]


class ChatCompletionRequest(_SamplingFields):
    endpoint = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template: str | None = None
    chat_template_kwargs: TemplateKwargs = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _chat_checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message: needs add_generation_prompt=false and an assistant message last")
        return self

    @model_validator(mode="after")
    def _tool_choice_matches_tools(self) -> "ChatCompletionRequest":
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise ValueError(f"tool_choice: {self.named_tool or choice!r} needs tools")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: function names must be unique, got {names}")
        if self.named_tool is not None and self.named_tool not in names:
            raise ValueError(f"tool_choice: {self.named_tool!r} is none of the tools' functions {names}")
        return self

    @property
    def named_tool(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def offers_tools(self) -> bool:
        """Whether the model is shown the tools and its output read for calls. With tool_choice
        none it is not shown them, so that it has no reason to write a call as text."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools or []] if self.offers_tools else None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeCompletionRequest(BaseModel):
    """vLLM's /tokenize of a prompt. Special tokens are left out by default, as the engine
    encodes a prompt: `count` is then the prompt's usage.prompt_tokens."""

    model_config = _STRICT

    model: str | None = None
    prompt: str
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """vLLM's /tokenize of a conversation, rendered as /v1/chat/completions renders it."""

    model_config = _STRICT

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    chat_template: str | None = None
    chat_template_kwargs: TemplateKwargs = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[int]
