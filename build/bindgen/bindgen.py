#!/usr/bin/python3
"""Generates bindings/NativeMethods.g.cs from native/include/qwen3native.h with libclang.

    /usr/bin/python3 build/bindgen/bindgen.py [--header H] [--output F] [--check]
    (or: dotnet run build.cs -- bindings)

Needs Debian's python3-clang-14 (apt-get install -y python3-clang-14). Everything in the output
comes from the header: exported functions (those declared with Q3N_API), enums, structs, integer
#defines and the comments above or beside each declaration. The output depends only on the
header, so the same header gives byte-identical output; tests check that the committed file is
current.

Exit status: 0 done (or up to date with --check), 1 out of date (--check), 2 the header uses
something this generator cannot map, 3 libclang or its Python binding is missing.
"""

import argparse
import os
import re
import sys

MISSING_DEPENDENCY = 3
INSTALL_HINT = ("install Debian's python3-clang-14 (apt-get install -y python3-clang-14, or "
                "`dotnet run build.cs -- deps` as root) and run this script with /usr/bin/python3")

try:
    import clang.cindex as ci
except ImportError as e:
    print(f"bindgen: cannot import clang.cindex ({e}): {INSTALL_HINT}", file=sys.stderr)
    sys.exit(MISSING_DEPENDENCY)

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
HEADER_REL = "native/include/qwen3native.h"
OUTPUT_REL = "bindings/NativeMethods.g.cs"

# The Python binding is version-specific; pair it with the libclang of the same release rather
# than whatever libclang.so the loader would find first.
LIBCLANG_CANDIDATES = [
    "/usr/lib/llvm-14/lib/libclang-14.so.1",
    "/usr/lib/x86_64-linux-gnu/libclang-14.so.1",
]

# A fixed target makes the layout constants independent of the machine that runs the generator.
# The header uses only fixed-width integers, enums and pointers, so LP64 and LLP64 64-bit targets
# agree on every size and offset; the layout tests check that on the machine that runs them.
CLANG_ARGS = ["-x", "c", "-std=c11", "--target=x86_64-pc-linux-gnu", "-DQ3N_BINDGEN=1"]

FIXED_WIDTH = {
    "int8_t": "sbyte", "uint8_t": "byte", "int16_t": "short", "uint16_t": "ushort",
    "int32_t": "int", "uint32_t": "uint", "int64_t": "long", "uint64_t": "ulong",
    "size_t": "nuint", "ptrdiff_t": "nint", "intptr_t": "nint", "uintptr_t": "nuint",
}

BUILTIN = {
    ci.TypeKind.VOID: "void", ci.TypeKind.BOOL: "byte",
    ci.TypeKind.CHAR_S: "byte", ci.TypeKind.CHAR_U: "byte", ci.TypeKind.UCHAR: "byte", ci.TypeKind.SCHAR: "sbyte",
    ci.TypeKind.SHORT: "short", ci.TypeKind.USHORT: "ushort", ci.TypeKind.INT: "int", ci.TypeKind.UINT: "uint",
    ci.TypeKind.LONGLONG: "long", ci.TypeKind.ULONGLONG: "ulong",
    ci.TypeKind.FLOAT: "float", ci.TypeKind.DOUBLE: "double",
}


class Unsupported(Exception):
    pass


def load_libclang():
    path = os.environ.get("LIBCLANG_PATH") or next((p for p in LIBCLANG_CANDIDATES if os.path.exists(p)), None)
    if path:
        ci.Config.set_library_file(path)
    try:
        return ci.Index.create()
    except Exception as e:  # cindex raises LibclangError, absent from some versions' namespace
        print(f"bindgen: cannot load libclang ({e}): {INSTALL_HINT}", file=sys.stderr)
        sys.exit(MISSING_DEPENDENCY)


# ---- comments -------------------------------------------------------------------------------------

class Comments:
    """Comment tokens of the header, looked up by line: libclang attaches only Doxygen-style
    comments to declarations, and this header uses plain /* */ comments above or beside them."""

    def __init__(self, tu, header):
        with open(header, encoding="utf-8") as f:
            self.lines = f.read().split("\n")
        self.by_end_line = {}
        self.by_start_line = {}
        for tok in tu.get_tokens(extent=tu.cursor.extent):
            if tok.kind != ci.TokenKind.COMMENT or not same_file(tok.location, header):
                continue
            start, end = tok.extent.start, tok.extent.end
            entry = (start.line, start.column, end.line, tok.spelling)
            self.by_end_line[end.line] = entry
            self.by_start_line.setdefault(start.line, []).append(entry)

    def above(self, cursor):
        """The comment that ends on the line just above the declaration (no blank line between)."""
        entry = self.by_end_line.get(cursor.extent.start.line - 1)
        if entry is None or is_banner(entry[3]) or not self.starts_line(entry):
            return []
        return clean_comment(entry[3])

    def starts_line(self, entry):
        # A comment after code on its line belongs to that code, not to the declaration below.
        line, column = entry[0], entry[1]
        return self.lines[line - 1][:column - 1].strip() == ""

    def beside(self, cursor):
        """The comment that starts on the declaration's last line, after it."""
        end = cursor.extent.end
        for line, column, _, text in self.by_start_line.get(end.line, []):
            if column >= end.column:
                return clean_comment(text)
        return []

    def of(self, cursor):
        return self.above(cursor) + self.beside(cursor)


def is_banner(text):
    return text.startswith("/* ----")


def clean_comment(text):
    if text.startswith("//"):
        return [text[2:].strip()]
    body = text[2:-2]
    lines = []
    for line in body.split("\n"):
        line = line.strip()
        if line.startswith("*"):
            line = line[1:].strip()
        if line:
            lines.append(line)
    return lines


def xml_escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def summary(lines, indent, remarks=None):
    out = []
    if lines:
        if len(lines) == 1:
            out.append(f"{indent}/// <summary>{xml_escape(lines[0])}</summary>")
        else:
            out.append(f"{indent}/// <summary>")
            out.extend(f"{indent}/// {xml_escape(l)}" for l in lines)
            out.append(f"{indent}/// </summary>")
    if remarks:
        out.append(f"{indent}/// <remarks>")
        out.extend(f"{indent}/// {xml_escape(l)}" for l in remarks)
        out.append(f"{indent}/// </remarks>")
    return out


# ---- types ----------------------------------------------------------------------------------------

def same_file(location, header):
    return location.file is not None and os.path.realpath(location.file.name) == header


def is_opaque_record(t):
    t = t.get_canonical()
    if t.kind != ci.TypeKind.RECORD:
        return False
    return t.get_declaration().get_definition() is None


def function_pointer(proto, where):
    params = [cs_type(a, where) for a in proto.argument_types()]
    return "delegate* unmanaged[Cdecl]<" + ", ".join(params + [cs_type(proto.get_result(), where)]) + ">"


def cs_type(t, where):
    """The blittable C# spelling of a C type. Pointers to opaque structs (handles) become nint."""
    if t.kind == ci.TypeKind.ELABORATED:
        t = t.get_named_type()
    if t.kind == ci.TypeKind.TYPEDEF:
        name = t.get_declaration().spelling
        if name in FIXED_WIDTH:
            return FIXED_WIDTH[name]
        underlying = t.get_canonical()
        if underlying.kind == ci.TypeKind.ENUM:
            enum_name = underlying.get_declaration().spelling
            return enum_name if enum_name else cs_type(underlying, where)
        if underlying.kind == ci.TypeKind.RECORD and not is_opaque_record(underlying):
            return underlying.get_declaration().spelling
        if underlying.kind == ci.TypeKind.RECORD:
            raise Unsupported(f"{where}: opaque struct {name} used by value")
        return cs_type(underlying, where)
    if t.kind == ci.TypeKind.POINTER:
        pointee = t.get_pointee()
        if pointee.kind == ci.TypeKind.ELABORATED:
            pointee = pointee.get_named_type()
        canonical = pointee.get_canonical()
        if canonical.kind == ci.TypeKind.FUNCTIONPROTO:
            return function_pointer(canonical, where)
        if canonical.kind == ci.TypeKind.FUNCTIONNOPROTO:
            raise Unsupported(f"{where}: function pointer without a prototype")
        if is_opaque_record(canonical):
            return "nint"
        return cs_type(pointee, where) + "*"
    if t.kind == ci.TypeKind.ENUM:
        name = t.get_declaration().spelling
        if name:
            return name
        return cs_type(t.get_declaration().enum_type, where)
    if t.kind == ci.TypeKind.RECORD:
        if is_opaque_record(t):
            raise Unsupported(f"{where}: opaque struct used by value")
        return t.get_declaration().spelling
    if t.kind in BUILTIN:
        return BUILTIN[t.kind]
    if t.kind in (ci.TypeKind.LONG, ci.TypeKind.ULONG):
        raise Unsupported(f"{where}: `long` differs between LP64 and LLP64; use a fixed-width type")
    raise Unsupported(f"{where}: cannot map C type `{t.spelling}` ({t.kind})")


def typedef_function_doc(t, docs):
    """The comment of a function-pointer typedef, so a field of that type can repeat it."""
    if t.kind == ci.TypeKind.ELABORATED:
        t = t.get_named_type()
    if t.kind != ci.TypeKind.TYPEDEF:
        return None
    decl = t.get_declaration()
    canonical = t.get_canonical()
    if canonical.kind == ci.TypeKind.POINTER and canonical.get_pointee().kind == ci.TypeKind.FUNCTIONPROTO:
        return [f"{decl.spelling}: " + " ".join(docs.get(decl.spelling, []))]
    return None


# ---- the header -----------------------------------------------------------------------------------

def collect(tu, header, comments):
    model = {"macros": [], "enums": [], "constants": [], "structs": [], "functions": [], "typedef_docs": {}}
    exported_at = set()
    deprecated_at = {}
    for c in tu.cursor.get_children():
        if not same_file(c.location, header):
            continue
        if c.kind == ci.CursorKind.MACRO_INSTANTIATION and c.spelling == "Q3N_API":
            exported_at.add((c.extent.start.line, c.extent.start.column))
        elif c.kind == ci.CursorKind.MACRO_INSTANTIATION and c.spelling == "Q3N_DEPRECATED":
            tokens = [t.spelling for t in c.get_tokens()]
            message = next((t for t in tokens if t.startswith('"')), '""')
            deprecated_at[c.extent.start.line] = message
        elif c.kind == ci.CursorKind.MACRO_DEFINITION:
            tokens = [t.spelling for t in c.get_tokens()]
            if len(tokens) == 2 and c.spelling.startswith("Q3N_") and re.fullmatch(r"\d+[uU]?", tokens[1]):
                model["macros"].append((c.spelling, int(tokens[1].rstrip("uU")), comments.above(c)))

    seen_records = set()
    for c in tu.cursor.get_children():
        if not same_file(c.location, header):
            continue
        where = f"{os.path.basename(header)}:{c.location.line}"
        if c.kind == ci.CursorKind.ENUM_DECL:
            members = [(m.spelling, m.enum_value, comments.of(m)) for m in c.get_children()
                       if m.kind == ci.CursorKind.ENUM_CONSTANT_DECL]
            if c.spelling and not c.is_anonymous():
                if c.type.get_size() != 4:
                    raise Unsupported(f"{where}: enum {c.spelling} is not 4 bytes")
                for name, value, _ in members:
                    if not -2**31 <= value < 2**31:
                        raise Unsupported(f"{where}: {name} does not fit an int")
                model["enums"].append((c.spelling, members, comments.above(c)))
            else:
                model["constants"].append((cs_type(c.enum_type, where), members))
        elif c.kind == ci.CursorKind.TYPEDEF_DECL:
            model["typedef_docs"][c.spelling] = comments.above(c)
        elif c.kind == ci.CursorKind.STRUCT_DECL and c.is_definition() and c.spelling not in seen_records:
            seen_records.add(c.spelling)
            fields = []
            for f in c.get_children():
                if f.kind != ci.CursorKind.FIELD_DECL:
                    continue
                fwhere = f"{where} {c.spelling}.{f.spelling}"
                if f.is_bitfield():
                    raise Unsupported(f"{fwhere}: bit-fields have no C# equivalent")
                length = None
                if f.type.kind == ci.TypeKind.CONSTANTARRAY:
                    element = cs_type(f.type.element_type, fwhere)
                    if element not in FIXED_BUFFER_ELEMENTS:
                        raise Unsupported(f"{fwhere}: C# fixed buffers hold only primitive types, not {element}")
                    length = array_length(f, model["macros"])
                    ftype = element
                elif f.type.get_canonical().kind in (ci.TypeKind.CONSTANTARRAY, ci.TypeKind.INCOMPLETEARRAY):
                    raise Unsupported(f"{fwhere}: this kind of array is not mapped")
                else:
                    ftype = cs_type(f.type, fwhere)
                fields.append({
                    "name": f.spelling,
                    "type": ftype,
                    "length": length,
                    "offset": c.type.get_offset(f.spelling) // 8,
                    "doc": comments.of(f),
                    "ctype": f.type,
                })
            model["structs"].append({
                "name": c.spelling, "fields": fields, "size": c.type.get_size(), "doc": comments.above(c),
            })
        elif c.kind == ci.CursorKind.FUNCTION_DECL:
            if (c.extent.start.line, c.extent.start.column) not in exported_at:
                continue
            params = []
            for i, a in enumerate(c.get_arguments()):
                name = a.spelling or f"arg{i}"
                params.append((cs_type(a.type, f"{where} {c.spelling}({name})"), escape_identifier(name)))
            deprecated = next((m for line, m in deprecated_at.items()
                               if c.extent.start.line <= line <= c.extent.end.line), None)
            model["functions"].append({
                "name": c.spelling, "result": cs_type(c.result_type, f"{where} {c.spelling}"),
                "params": params, "doc": comments.above(c), "deprecated": deprecated,
            })
    return model


FIXED_BUFFER_ELEMENTS = {"bool", "byte", "short", "int", "long", "char", "sbyte", "ushort", "uint", "ulong", "float", "double"}


def array_length(field, macros):
    """The array's length as the header spells it: a Q3N_ constant's name when it uses one, so the
    C# reads like the C and follows the constant."""
    tokens = [t.spelling for t in field.get_tokens()]
    if "[" in tokens:
        inside = tokens[tokens.index("[") + 1:]
        if len(inside) >= 2 and inside[1] == "]" and any(name == inside[0] for name, _, _ in macros):
            return "NativeMethods." + inside[0]
    return str(field.type.get_array_size())


CS_KEYWORDS = {"base", "bool", "byte", "char", "checked", "class", "const", "decimal", "default", "delegate",
               "double", "event", "fixed", "float", "in", "int", "internal", "lock", "long", "object",
               "operator", "out", "params", "private", "public", "ref", "string", "this", "uint",
               "ulong", "ushort", "value"}


def escape_identifier(name):
    return "@" + name if name in CS_KEYWORDS else name


# ---- output ---------------------------------------------------------------------------------------

def render(model):
    abi = next((value for name, value, _ in model["macros"] if name == "Q3N_ABI_VERSION"), None)
    if abi is None:
        raise Unsupported("the header defines no Q3N_ABI_VERSION")

    out = [
        f"// <auto-generated> by build/bindgen from {HEADER_REL}. Do not edit.",
        "// Regenerate with `dotnet run build.cs -- bindings`. Sizes and offsets are libclang's for x86_64.",
        "#nullable enable",
        "",
        "using System.Runtime.CompilerServices;",
        "using System.Runtime.InteropServices;",
        "",
        "namespace Qwen3Native.Interop;",
    ]

    for name, members, doc in model["enums"]:
        out.append("")
        out.extend(summary(doc, ""))
        out.append(f"internal enum {name}")
        out.append("{")
        for member, value, mdoc in members:
            out.extend(summary(mdoc, "    "))
            out.append(f"    {member} = {value},")
        out.append("}")

    for s in model["structs"]:
        out.append("")
        out.extend(summary(s["doc"], ""))
        out.append("[StructLayout(LayoutKind.Sequential)]")
        out.append(f"internal unsafe struct {s['name']}")
        out.append("{")
        for i, f in enumerate(s["fields"]):
            if i:
                out.append("")
            remarks = typedef_function_doc(f["ctype"], model["typedef_docs"])
            out.extend(summary(f["doc"], "    ", remarks))
            if f["length"] is None:
                out.append(f"    public {f['type']} {escape_identifier(f['name'])};")
            else:
                out.append(f"    public fixed {f['type']} {escape_identifier(f['name'])}[{f['length']}];")
        out.append("}")

    out.append("")
    out.append("internal static unsafe partial class NativeMethods")
    out.append("{")
    out.append('    public const string LibraryName = "qwen3native";')
    for name, value, doc in model["macros"]:
        out.append("")
        out.extend(summary(doc, "    "))
        if name == "Q3N_ABI_VERSION":
            out.append(f"    public const uint AbiVersion = {value};")
        else:
            out.append(f"    public const int {name} = {value};")
    for cs_underlying, members in model["constants"]:
        for member, value, mdoc in members:
            out.append("")
            out.extend(summary(mdoc, "    "))
            out.append(f"    public const {cs_underlying} {member} = {value};")
    for fn in model["functions"]:
        out.append("")
        out.extend(summary(fn["doc"], "    "))
        if fn["deprecated"] is not None:
            out.append(f"    [global::System.Obsolete({fn['deprecated']})]")
        out.append("    [LibraryImport(LibraryName)]")
        out.append("    [UnmanagedCallConv(CallConvs = new[] { typeof(CallConvCdecl) })]")
        params = ", ".join(f"{t} {n}" for t, n in fn["params"])
        out.append(f"    internal static partial {fn['result']} {fn['name']}({params});")
    out.append("}")

    out.append("")
    out.append("/// <summary>Sizes and field offsets of the header's structs, in bytes, as libclang laid them out.</summary>")
    out.append("internal static class NativeLayout")
    out.append("{")
    for i, s in enumerate(model["structs"]):
        if i:
            out.append("")
        out.append(f"    public const int {s['name']}_size = {s['size']};")
        for f in s["fields"]:
            out.append(f"    public const int {s['name']}_{f['name']}_offset = {f['offset']};")
    out.append("}")
    return "\n".join(out) + "\n"


def generate(header):
    index = load_libclang()
    options = ci.TranslationUnit.PARSE_DETAILED_PROCESSING_RECORD | ci.TranslationUnit.PARSE_SKIP_FUNCTION_BODIES
    tu = index.parse(header, args=CLANG_ARGS, options=options)
    errors = [d for d in tu.diagnostics if d.severity >= ci.Diagnostic.Error]
    if errors:
        raise Unsupported("the header does not parse: " + "; ".join(str(d) for d in errors))
    return render(collect(tu, header, Comments(tu, header)))


def main():
    parser = argparse.ArgumentParser(description="Generate the P/Invoke bindings from the C header.")
    parser.add_argument("--header", default=os.path.join(REPO, HEADER_REL))
    parser.add_argument("--output", default=os.path.join(REPO, OUTPUT_REL))
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args()

    header = os.path.realpath(args.header)
    try:
        text = generate(header)
    except Unsupported as e:
        print(f"bindgen: {e}", file=sys.stderr)
        return 2

    data = text.encode("utf-8")
    if args.check:
        try:
            with open(args.output, "rb") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != data:
            print(f"bindgen: {args.output} is out of date; run `dotnet run build.cs -- bindings`", file=sys.stderr)
            return 1
        return 0

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "wb") as f:
        f.write(data)
    print(f"bindgen: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
