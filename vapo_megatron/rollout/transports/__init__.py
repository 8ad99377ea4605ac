"""Ways to move a policy version's weights into rollout engines, one file per transport (slime's layout).

- `base`: the `WeightTransport` protocol (begin(version) / push(bucket) / finish) every transport implements.
- `colocated`: the rollout engine lives in the trainer's process (the hybrid engine); buckets are handed to its
  vLLM worker by reference.
- `broadcast`: a trainer export rank broadcasts each bucket over a process group (gloo on CPU, NCCL on GPU) to
  rollout ranks, each of which feeds its own transport (e.g. a `ColocatedTransport` of its engine).
- `memory`: keeps what it is pushed, in host memory (a receiver for tests and for exports that want a dict).

Driving a transport: `rollout.weight_sync.push_weights(transport, named_tensors, bucket_bytes, version)`.
"""
