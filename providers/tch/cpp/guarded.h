// What kiln's C ABIs over libtorch share (cpp/aoti.cpp, cuda/graphs.cpp): C++ exceptions
// stopped at the boundary, since a Rust caller cannot unwind them. Each library that
// includes this has its own per-thread message behind its own `*_error()` function.
#pragma once

#include <exception>
#include <string>

namespace {

thread_local std::string last_error;

// Runs `f`; 0 on success, else 1 with the exception's message kept in `last_error`.
template <class F>
int guarded(F f) {
    try {
        f();
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
    } catch (...) {
        last_error = "a C++ exception that is not a std::exception";
    }
    return 1;
}

}  // namespace
