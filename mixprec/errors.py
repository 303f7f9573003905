"""Typed errors. Every message names the file / tensor / config entry and what was expected."""


class MixprecError(Exception):
    """Base class of every error mixprec raises on bad input."""


class ConfigError(MixprecError):
    """The mix config (YAML or dict) is invalid: unknown format, rule matching nothing, conflicts."""


class CheckpointError(MixprecError):
    """A checkpoint directory is unreadable: missing/corrupt shard, index naming absent tensors."""


class MissingWeight(CheckpointError):
    """A tensor the model needs is not in the checkpoint chosen for it."""


class ShapeMismatch(CheckpointError):
    """A tensor has a shape (or dtype) other than the model/format expects."""


class FormatError(MixprecError):
    """Tensors do not form a valid weight of any supported format, or a format variant is unsupported."""


class ModelMismatch(ConfigError):
    """Sources of one mix describe different models (hidden size, layers, experts, vocab...)."""


class ParallelError(ConfigError):
    """A tensor/expert parallel layout cannot be realised for this model and world size."""


class RequestError(MixprecError, ValueError):
    """A generation request is invalid (Engine.submit); `param` names the request field at fault
    (the `param` of an OpenAI-style 400: "prompt", "logit_bias", "max_tokens", "stop")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param
