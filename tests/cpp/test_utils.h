// Small helpers shared by the GoogleTest files.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <utility>

namespace qlora::test {

// Runs f and checks that it throws an exception whose message contains
// `expected` (the test of an error is the message a user will read).
template <typename F>
void expect_error(F&& f, const std::string& expected) {
  try {
    std::forward<F>(f)();
  } catch (const std::exception& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(expected), std::string::npos)
        << "error message does not contain \"" << expected << "\":\n"
        << what;
    return;
  }
  ADD_FAILURE() << "expected an error containing \"" << expected << "\", but nothing was thrown";
}

}  // namespace qlora::test
