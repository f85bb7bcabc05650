// repr() of a Python float, so JSON we write matches Python's json.dumps
// byte for byte (bitsandbytes stores nested_offset that way).
#pragma once

#include <string>

namespace qlora::detail {

// Shortest round-trip digits; fixed notation for decimal exponents in
// [-4, 16) with a trailing ".0" when integral, otherwise "d.ddde-XX".
std::string python_float_repr(double value);

}  // namespace qlora::detail
