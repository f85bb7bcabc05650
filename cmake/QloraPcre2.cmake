# PCRE2 (the tokenizers' pre-tokenizer regexes) as PkgConfig::PCRE2: through
# pkg-config, or found directly where there is none (the GPU machines of
# tools/device/gpu_check.sh). Included at the top so every folder sees it.
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(PCRE2 QUIET IMPORTED_TARGET libpcre2-8)
endif()
if(NOT TARGET PkgConfig::PCRE2)
  find_path(QLORA_PCRE2_INCLUDE_DIR pcre2.h REQUIRED)
  find_library(QLORA_PCRE2_LIBRARY pcre2-8 REQUIRED)
  add_library(PkgConfig::PCRE2 INTERFACE IMPORTED)
  set_target_properties(PkgConfig::PCRE2 PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${QLORA_PCRE2_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${QLORA_PCRE2_LIBRARY}")
endif()
