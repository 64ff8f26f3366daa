//! The buffers of a TorchScript module (BatchNorm's running statistics, registered masks, ...),
//! which tch's C API does not expose: `named_buffers` of the `torch::jit::Module` a tch
//! `CModule` holds, each handed to the caller as a new `at::Tensor` handle on the same storage,
//! so in-place writes through it reach the module. Compiled by `worker/build.rs` against the
//! libtorch that tch links.

#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <exception>

extern "C" {

// Calls `f(data, name, tensor)` for every buffer of `module` and its submodules, in the
// module's order, with dotted names (`layer1.0.bn1.running_mean`); `tensor` is a new
// `at::Tensor*` the callee owns. Returns null, or an error message the caller frees with
// `free`.
char *ringmaster_module_named_buffers(void *module, void *data,
                                      void (*f)(void *, const char *, void *)) {
  try {
    auto *m = static_cast<torch::jit::Module *>(module);
    for (const auto &b : m->named_buffers(/*recurse=*/true)) {
      f(data, b.name.c_str(), new at::Tensor(b.value));
    }
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception");
  }
}

}  // extern "C"
