// Optional: typing a date picks "Custom"; choosing a preset clears the dates.
document.addEventListener("DOMContentLoaded", () => {
  const range = document.getElementById("range");
  const dates = ["from", "to"].map((id) => document.getElementById(id)).filter(Boolean);
  if (!range) return;
  for (const input of dates) {
    input.addEventListener("input", () => { if (input.value) range.value = "custom"; });
  }
  range.addEventListener("change", () => {
    if (range.value !== "custom") for (const input of dates) input.value = "";
  });
});
