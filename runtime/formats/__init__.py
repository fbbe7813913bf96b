"""The file formats the runtime reads: each a versioned, validated data class (JSON or safetensors on disk).

They depend on nothing of the compiler; the compiler writes them, the runtime reads them."""
