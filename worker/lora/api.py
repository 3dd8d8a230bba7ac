"""The request bodies of the adapter endpoints, in vLLM's shapes: POST /v1/load_lora_adapter
{"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}."""

from pydantic import BaseModel, ConfigDict, Field


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256, description="the model name requests will use")
    lora_path: str = Field(min_length=1, description="a PEFT adapter folder on the worker's disk")


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = Field(None, description="accepted for vLLM's clients, not used")
