using System.CommandLine;

namespace Qwen3Native.Cli;

/// <summary><c>qwen3 tokenize</c>: text to token ids with the checkpoint's tokenizer (no weights are loaded).</summary>
internal static class TokenizeCommand
{
    public static Command Create(CliConsole console)
    {
        var model = new Option<string>("--model", "-m")
        {
            Description = "Checkpoint directory holding tokenizer.json",
            HelpName = "DIR",
            Required = true,
        };
        var text = new Option<string?>("--text") { Description = "The text to tokenize (special tokens such as <|im_start|> are recognised)", HelpName = "T" };
        var textFile = new Option<string?>("--text-file") { Description = "Read the text from a UTF-8 file", HelpName = "F" };
        var json = new Option<bool>("--json") { Description = "Print the ids as a JSON array only" };

        var command = new Command("tokenize", "Token ids of a text: comma-separated (ready for generate --prompt-ids), or a JSON array");
        command.Add(model);
        command.Add(text);
        command.Add(textFile);
        command.Add(json);
        command.Validators.Add(result =>
        {
            if ((result.GetResult(text) is null) == (result.GetResult(textFile) is null))
                result.AddError("Give exactly one of --text or --text-file.");
        });
        command.SetAction(Cli.Guard(console, (r, _) =>
        {
            var tokenizer = ModelLoading.LoadTokenizer(r.GetRequiredValue(model));
            string input = r.GetValue(text) ?? File.ReadAllText(r.GetValue(textFile)!);
            int[] ids = tokenizer.Encode(input);
            console.Out.WriteLine(r.GetValue(json)
                ? Output.Json(w =>
                {
                    w.WriteStartArray();
                    foreach (int id in ids)
                        w.WriteNumberValue(id);
                    w.WriteEndArray();
                })
                : string.Join(",", ids));
            return Task.FromResult(Cli.ExitOk);
        }));
        return command;
    }
}
