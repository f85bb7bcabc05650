// Small POSIX file-system helpers (std::filesystem is avoided: the torch
// wheel exports its own, incompatible copies of its symbols).
#pragma once

#include <string>
#include <vector>

namespace qlora::fs {

bool exists(const std::string& path);
bool is_dir(const std::string& path);
bool is_file(const std::string& path);      // a regular file (or a link to one)
void make_dirs(const std::string& path);    // mkdir -p; errors name the path
void make_dir(const std::string& path);     // mkdir: the parent must exist; errors name the path
void remove_tree(const std::string& path);  // rm -rf; missing is fine
std::vector<std::string> list_dir(const std::string& path);  // names, sorted
// rename(2) and fsync of the parent folder, so the new name survives a
// crash. Throws if either fails (a file system that cannot fsync a folder,
// EINVAL, is as durable as it can be); after a failed folder fsync the new
// name is already in place.
void rename_durably(const std::string& from, const std::string& to);
// The whole file as bytes; errors name the path.
std::string read_file(const std::string& path);
std::string parent(const std::string& path);

}  // namespace qlora::fs
