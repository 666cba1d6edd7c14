"""The edge replica's inference core: one base model serving several adapter versions through
unmerged multi-LoRA slots while a training adapter is trained on the same weights.

- ``lora_layers``: the multi-LoRA layer and the thread-local adapter context.
- ``slots``: serving slots, shadow loading, validation and promotion of adapter versions.
- ``sampling``: per-request sampling parameters, samplers and stop-string rules.
- ``engine``: the continuous-batching inference engine; ``requests``: requests and their handles.
- ``coexec``: the trainer thread; ``runtime``: the replica; ``server``/``control``: its HTTP APIs.

Import the submodules directly: this package deliberately re-exports nothing, so light clients
(``control_client``, ``wire``) don't pull in torch.
"""
