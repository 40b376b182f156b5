#!/usr/bin/env bash
# Packs the Qwen3Native NuGet package into out/packages and prints the package's path as the last line.
# It packs the native engine already built in out/build: run `dotnet run build.cs -- native` first (the csproj also
# stops the pack with that message when the library is missing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
project=managed/Qwen3Native/Qwen3Native.csproj
out="$root/out/packages"

if [[ ! -e out/build/libqwen3native.so ]]; then
  echo "pack.sh: out/build/libqwen3native.so is missing: run \`dotnet run build.cs -- native\` first" >&2
  exit 1
fi

dotnet pack "$project" -c Release -o "$out" --nologo

# The name comes from the project's own PackageId and version, not from a directory listing, so that an older
# package left in out/packages is never reported as this one.
id="$(dotnet msbuild "$project" -p:Configuration=Release -getProperty:PackageId)"
version="$(dotnet msbuild "$project" -p:Configuration=Release -getProperty:PackageVersion)"
package="$out/$id.$version.nupkg"
if [[ ! -f "$package" ]]; then
  echo "pack.sh: dotnet pack succeeded but $package is not there" >&2
  exit 1
fi
echo "$package"
