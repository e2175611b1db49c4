from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scalar(_message.Message):
    __slots__ = ("s", "i", "b")
    S_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    s: str
    i: int
    b: bool
    def __init__(self, s: _Optional[str] = ..., i: _Optional[int] = ..., b: _Optional[bool] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("eq", "any_of", "lt", "le", "gt", "ge", "prefix")
    EQ_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    LE_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    GE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    eq: Scalar
    any_of: _containers.RepeatedCompositeFieldContainer[Scalar]
    lt: int
    le: int
    gt: int
    ge: int
    prefix: str
    def __init__(self, eq: _Optional[_Union[Scalar, _Mapping]] = ..., any_of: _Optional[_Iterable[_Union[Scalar, _Mapping]]] = ..., lt: _Optional[int] = ..., le: _Optional[int] = ..., gt: _Optional[int] = ..., ge: _Optional[int] = ..., prefix: _Optional[str] = ...) -> None: ...

class Capability(_message.Message):
    __slots__ = ("res", "act", "when")
    class WhenEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Constraint
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Constraint, _Mapping]] = ...) -> None: ...
    RES_FIELD_NUMBER: _ClassVar[int]
    ACT_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    res: str
    act: _containers.RepeatedScalarFieldContainer[str]
    when: _containers.MessageMap[str, Constraint]
    def __init__(self, res: _Optional[str] = ..., act: _Optional[_Iterable[str]] = ..., when: _Optional[_Mapping[str, Constraint]] = ...) -> None: ...

class Jwk(_message.Message):
    __slots__ = ("kty", "crv", "x", "y")
    KTY_FIELD_NUMBER: _ClassVar[int]
    CRV_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    kty: str
    crv: str
    x: str
    y: str
    def __init__(self, kty: _Optional[str] = ..., crv: _Optional[str] = ..., x: _Optional[str] = ..., y: _Optional[str] = ...) -> None: ...

class DelegateRequest(_message.Message):
    __slots__ = ("sub", "holder_jwk", "caps", "ttl_seconds", "aud", "dpt", "use", "idempotency_key", "kid")
    SUB_FIELD_NUMBER: _ClassVar[int]
    HOLDER_JWK_FIELD_NUMBER: _ClassVar[int]
    CAPS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUD_FIELD_NUMBER: _ClassVar[int]
    DPT_FIELD_NUMBER: _ClassVar[int]
    USE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    sub: str
    holder_jwk: Jwk
    caps: _containers.RepeatedCompositeFieldContainer[Capability]
    ttl_seconds: int
    aud: _containers.RepeatedScalarFieldContainer[str]
    dpt: int
    use: int
    idempotency_key: str
    kid: str
    def __init__(self, sub: _Optional[str] = ..., holder_jwk: _Optional[_Union[Jwk, _Mapping]] = ..., caps: _Optional[_Iterable[_Union[Capability, _Mapping]]] = ..., ttl_seconds: _Optional[int] = ..., aud: _Optional[_Iterable[str]] = ..., dpt: _Optional[int] = ..., use: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., kid: _Optional[str] = ...) -> None: ...

class DelegateResponse(_message.Message):
    __slots__ = ("chain", "jti", "kid", "expires_at", "idempotent_replay")
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_REPLAY_FIELD_NUMBER: _ClassVar[int]
    chain: str
    jti: str
    kid: str
    expires_at: int
    idempotent_replay: bool
    def __init__(self, chain: _Optional[str] = ..., jti: _Optional[str] = ..., kid: _Optional[str] = ..., expires_at: _Optional[int] = ..., idempotent_replay: _Optional[bool] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("jti", "reason")
    JTI_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    jti: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, jti: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revocation_list",)
    REVOCATION_LIST_FIELD_NUMBER: _ClassVar[int]
    revocation_list: RevocationList
    def __init__(self, revocation_list: _Optional[_Union[RevocationList, _Mapping]] = ...) -> None: ...

class GetRevocationListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevocationList(_message.Message):
    __slots__ = ("token", "seq", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    seq: int
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., seq: _Optional[int] = ..., expires_at: _Optional[int] = ...) -> None: ...

class GetTrustBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("jwks",)
    JWKS_FIELD_NUMBER: _ClassVar[int]
    jwks: str
    def __init__(self, jwks: _Optional[str] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("kid", "alg", "public_jwk", "not_before", "expires", "active")
    KID_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_JWK_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    kid: str
    alg: str
    public_jwk: Jwk
    not_before: int
    expires: int
    active: bool
    def __init__(self, kid: _Optional[str] = ..., alg: _Optional[str] = ..., public_jwk: _Optional[_Union[Jwk, _Mapping]] = ..., not_before: _Optional[int] = ..., expires: _Optional[int] = ..., active: _Optional[bool] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("new_kid", "alg", "not_before")
    NEW_KID_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    new_kid: str
    alg: str
    not_before: int
    def __init__(self, new_kid: _Optional[str] = ..., alg: _Optional[str] = ..., not_before: _Optional[int] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("new_key", "previous_key")
    NEW_KEY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_KEY_FIELD_NUMBER: _ClassVar[int]
    new_key: KeyInfo
    previous_key: KeyInfo
    def __init__(self, new_key: _Optional[_Union[KeyInfo, _Mapping]] = ..., previous_key: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class GetAuditCheckpointsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class AuditCheckpoint(_message.Message):
    __slots__ = ("seq", "head", "token")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    seq: int
    head: str
    token: str
    def __init__(self, seq: _Optional[int] = ..., head: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class GetAuditCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints", "head_seq", "head_hash")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[AuditCheckpoint]
    head_seq: int
    head_hash: str
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[AuditCheckpoint, _Mapping]]] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ...) -> None: ...
